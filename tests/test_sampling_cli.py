"""Text generation: tokenizers around `generate` / `stream`, checkpoints, and `retnet-jax generate`.

The CLI runs in-process (`cli.main`), on a converted checkpoint written with `save_converted` from a
tiny byte-vocabulary RetNet. Oracle: `generate_text` on the same model (which is `generate` on the
encoded prompt); the CLI streams, so this also checks that streamed text equals generated text.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np
import pytest
from flax import nnx

from retnet_jax import RetNet, RetNetConfig, cli
from retnet_jax.data.tokenizers import ByteTokenizer
from retnet_jax.interop import save_converted
from retnet_jax.sampling import checkpoints
from retnet_jax.sampling.text import _text_increments, generate_text, stream_text

BYTES = ByteTokenizer()
PROMPT = "héllo, "


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A convert-torchscale-style directory holding a tiny RetNet over the byte vocabulary (257)."""
    model = RetNet(RetNetConfig.preset("tiny", vocab_size=BYTES.vocab_size), rngs=nnx.Rngs(1))
    return save_converted(model, tmp_path_factory.mktemp("converted") / "ckpt")


@pytest.fixture(scope="module")
def loaded(converted):
    return checkpoints.load_for_generation(converted)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["generate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, settings", [
    ([], {}),
    (["--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", "3"],
     dict(temperature=1.0, top_p=0.9, top_k=50, seed=3)),
], ids=["greedy", "sampled"])
def test_cli_streams_the_generated_text_of_a_converted_checkpoint(converted, loaded, capsys, args, settings):
    """`retnet-jax generate --checkpoint DIR --prompt P ...` prints P and then exactly the text
    `generate_text` gives for the same settings."""
    code, out, err = run_cli(capsys, "--checkpoint", converted, "--prompt", PROMPT, "--max-new-tokens", 9,
                             *args)
    model, tokenizer = loaded
    assert code == 0 and err == ""
    assert out == PROMPT + generate_text(model, tokenizer, PROMPT, max_new_tokens=9, **settings)[0] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "prompt must be non-empty text"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an int >= 1"),
    (["--top-p", "1.5"], "top_p must lie in (0, 1]"),
    (["--top-k", "300"], "top_k must be an int in [1, vocab_size] = [1, 257]"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
])
def test_cli_reports_a_bad_argument_in_one_line(converted, capsys, args, message):
    code, out, err = run_cli(capsys, "--checkpoint", converted, "--prompt", "x", *args)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("retnet-jax generate: error: ") and message in err


def test_cli_reports_a_directory_without_a_model_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoints, "_trainer_loader", lambda: None)
    code, out, err = run_cli(capsys, "--checkpoint", tmp_path, "--prompt", "x")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("retnet-jax generate: error: checkpoint: ") and "holds no model" in err


def fake_trainer(monkeypatch, load_trained):
    """Install a stand-in `retnet_jax.train` exposing `load_trained`."""
    module = types.ModuleType("retnet_jax.train")
    module.__spec__ = importlib.machinery.ModuleSpec("retnet_jax.train", None)
    module.load_trained = load_trained
    monkeypatch.setitem(sys.modules, "retnet_jax.train", module)


def test_a_trainer_workdir_is_read_by_the_trainer(loaded, tmp_path, monkeypatch):
    """A directory that is not a conversion goes to `retnet_jax.train.load_trained`, whose model and
    tokenizer are used; one that the trainer cannot read is refused naming the checkpoint."""
    model, _ = loaded
    tokenizer = ByteTokenizer()
    fake_trainer(monkeypatch, lambda path: (model, tokenizer, {"workdir": str(path)}))
    assert checkpoints.load_for_generation(tmp_path) == (model, tokenizer)

    def unreadable(path):
        raise FileNotFoundError(f"no checkpoint in {path}")

    fake_trainer(monkeypatch, unreadable)
    with pytest.raises(ValueError, match=r"^checkpoint: .* holds no model the trainer can read"):
        checkpoints.load_for_generation(tmp_path)


def test_streamed_text_joins_to_the_generated_text(loaded):
    """`stream_text`'s pieces, joined, are `generate_text`'s continuation; both stop at the byte
    tokenizer's end-of-document id (256) unless told otherwise."""
    model, tokenizer = loaded
    settings = dict(max_new_tokens=9, temperature=1.0, seed=4)
    pieces = list(stream_text(model, tokenizer, PROMPT, **settings))
    assert "".join(pieces) == generate_text(model, tokenizer, PROMPT, **settings)[0]


def test_a_character_split_between_pieces_is_held_back_until_complete():
    """"é" is two bytes; streamed in separate pieces, no replacement character is ever shown."""
    pieces = [np.array([104]), np.array([195]), np.array([169, 33])]
    assert list(_text_increments(BYTES, pieces)) == ["h", "é!"]


def test_a_tokenizer_that_does_not_match_the_model_is_refused(loaded):
    """Byte ids up to 255 do not fit a 64-token model: the prompt is refused, naming the mismatch."""
    small = RetNet(RetNetConfig.preset("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"prompt: .* outside the model's vocabulary \[0, 64\)"):
        generate_text(small, BYTES, "é", max_new_tokens=2)
