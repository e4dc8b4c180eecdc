"""Generation: prefill then compiled recurrent decoding, greedy and sampled.

Oracle for greedy decoding: re-running the whole sequence in parallel mode and taking the argmax at
each position (the model is deterministic; float32 logits of the two paths agree to ~1e-6, far below
the gaps between the top two logits of these random models, which the test checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retnet_jax import RetNet, RetNetConfig
from retnet_jax.generate import generate, sample_logits

N_NEW = 12


@pytest.fixture(scope="module")
def model():
    return RetNet(RetNetConfig.preset("tiny", vocab_size=64), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.key(5), (3, 21), 0, 64)


@pytest.mark.parametrize("prefill_mode", ["chunkwise", "parallel"])
def test_greedy_generation_matches_argmax_of_a_parallel_pass(model, prompt, prefill_mode):
    """Given a prompt, greedy `generate` returns, at each step, the argmax of the parallel-mode logits
    of prompt + the tokens generated so far."""
    tokens, _ = generate(model, prompt, N_NEW, prefill_mode=prefill_mode)
    assert tokens.shape == (3, N_NEW) and tokens.dtype == jnp.int32
    full = jnp.concatenate([prompt, tokens], axis=1)
    logits, _ = model(full, mode="parallel")
    predicted = logits[:, prompt.shape[1] - 1:-1]
    top2 = jnp.sort(predicted, axis=-1)[..., -2:]
    assert float(jnp.min(top2[..., 1] - top2[..., 0])) > 1e-4  # no near-ties: argmax is well defined
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(predicted.argmax(-1)))


def test_returned_state_continues_the_sequence(model, prompt):
    """The returned state has consumed the prompt and all but the last new token: feeding that token
    gives the parallel logits at the last position."""
    tokens, state = generate(model, prompt, N_NEW)
    np.testing.assert_array_equal(np.asarray(state.position_b[0]), prompt.shape[1] + N_NEW - 1)
    next_logits, _ = model(tokens[:, -1:], mode="recurrent", state=state)
    full_logits, _ = model(jnp.concatenate([prompt, tokens], 1), mode="parallel")
    np.testing.assert_allclose(np.asarray(next_logits[:, 0]), np.asarray(full_logits[:, -1]),
                               rtol=1e-5, atol=1e-5)  # float32, recurrent vs parallel


def test_sampling_is_reproducible_and_top_k_one_is_greedy(model, prompt):
    """Same key, same tokens; a different key, different tokens (at temperature 1); top_k=1 is greedy."""
    a, _ = generate(model, prompt, N_NEW, key=jax.random.key(0), temperature=1.0)
    b, _ = generate(model, prompt, N_NEW, key=jax.random.key(0), temperature=1.0)
    c, _ = generate(model, prompt, N_NEW, key=jax.random.key(1), temperature=1.0)
    greedy, _ = generate(model, prompt, N_NEW)
    top1, _ = generate(model, prompt, N_NEW, key=jax.random.key(2), temperature=0.7, top_k=1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_top_k_samples_only_among_the_k_largest_logits():
    """With top_k=3, 2000 draws from one row land only on the 3 largest logits."""
    logits = jnp.tile(jnp.arange(10.0)[None], (2000, 1))
    draws = sample_logits(logits, jax.random.key(0), temperature=5.0, top_k=3)
    assert set(np.unique(np.asarray(draws))) == {7, 8, 9}


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, temperature=1.0), "key is required"),
    (dict(max_new_tokens=4, top_k=0), "top_k"),
    (dict(max_new_tokens=4, prefill_mode="recurrent"), "prefill_mode"),
])
def test_bad_arguments_are_named(model, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, **kwargs)


def test_out_of_vocabulary_prompt_is_rejected(model, prompt):
    with pytest.raises(ValueError, match="tokens must lie in"):
        generate(model, prompt.at[0, 0].set(64), 4)
