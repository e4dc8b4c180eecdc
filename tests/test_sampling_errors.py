"""Bad generation requests fail at once with a `ValueError` naming the argument (nothing compiles)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from retnet_jax import RetNet, RetNetConfig, generate, stream
from retnet_jax.baselines import Transformer, TransformerConfig
from retnet_jax.sampling import checkpoints

VOCAB = 40
CFG = RetNetConfig.preset("tiny", vocab_size=VOCAB)
PROMPTS = [[1, 2, 3], [4, 5]]


@pytest.fixture(scope="module")
def retnet():
    return RetNet(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([], {}, r"prompts must hold at least one prompt"),
    ([[1, 2], []], {}, r"prompts\[1\] is empty"),
    (np.zeros((2, 0), np.int32), {}, r"prompts\[0\] is empty"),
    ([[1, 2], [3, VOCAB]], {}, r"prompts\[1\] holds ids outside the vocabulary \[0, 40\)"),
    ([[-1, 2]], {}, r"prompts\[0\] holds ids outside"),
    ([[1.5, 2.0]], {}, r"prompts\[0\] must be a 1-D sequence of integer"),
    ("some text", {}, r"prompts must be a list of token-id sequences .* tokenizer"),
    (np.zeros((2, 4), np.int32), dict(lengths=[2, 5]), r"lengths must lie in \[0, 4\]"),
    (np.zeros((2, 4), np.int32), dict(lengths=[2]), r"lengths must be 2 ints"),
    (PROMPTS, dict(max_new_tokens=0), r"max_new_tokens must be an int >= 1, got 0"),
    (PROMPTS, dict(max_new_tokens=2.0), r"max_new_tokens"),
    (PROMPTS, dict(temperature=-0.5), r"temperature must be a finite number >= 0"),
    (PROMPTS, dict(top_k=0), r"top_k must be an int in \[1, vocab_size\] = \[1, 40\]"),
    (PROMPTS, dict(top_k=VOCAB + 1), r"top_k"),
    (PROMPTS, dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (PROMPTS, dict(top_p=1.5), r"top_p"),
    (PROMPTS, dict(prefill="recurrent"), r"prefill must be one of \('chunkwise', 'parallel'\)"),
    (PROMPTS, dict(eos_id=VOCAB), r"eos_id must be None or an id in \[0, 40\)"),
    (PROMPTS, dict(key=jax.random.split(jax.random.key(0), 3)),
     r"key must be one PRNG key or one per sequence \(2\)"),
    (PROMPTS, dict(seed="7"), r"seed must be an int"),
])
def test_bad_requests_are_refused_naming_the_argument(retnet, prompts, kwargs, match):
    kwargs = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(retnet, prompts, **kwargs)
    with pytest.raises(ValueError, match=match):  # at the call, not at the first next()
        stream(retnet, prompts, **kwargs)


def test_stream_refuses_a_block_of_no_steps(retnet):
    with pytest.raises(ValueError, match="block_steps must be a positive int"):
        stream(retnet, PROMPTS, max_new_tokens=4, block_steps=0)


def test_a_context_longer_than_the_transformer_cache_is_refused():
    """A KV cache of 8 tokens cannot take a 3-token prompt and 6 new tokens; the error names
    `capacity` and says how much is needed. RetNet, whose state does not grow, ignores capacity."""
    model = Transformer(TransformerConfig.from_retnet(CFG), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"capacity: a KV cache of 8 tokens .* pass capacity >= 9"):
        generate(model, PROMPTS, max_new_tokens=6, capacity=8)


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_a_directory_without_a_model_is_refused_naming_the_checkpoint(tmp_path, monkeypatch, make):
    """A missing path, or a directory holding neither a conversion nor (no trainer installed) a
    trainer workdir."""
    monkeypatch.setattr(checkpoints, "_trainer_loader", lambda: None)
    with pytest.raises(ValueError, match=r"^checkpoint: .*(not a directory|holds no model)"):
        checkpoints.load_for_generation(make(tmp_path))
