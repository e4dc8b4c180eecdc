"""Tokenizers: exact round trips, special ids, SentencePiece trained locally, and the CLI that trains it.

Oracle: the text itself (decode(encode(text)) must give it back character for character).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from retnet_jax.cli import main
from retnet_jax.data import (
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_on_source,
    train_sentencepiece,
)
from test_data_sources import write_corpus

TEXTS = [
    "def f(x):\n    return x  # tabs\tand  double  spaces\n",
    "  leading and trailing spaces  ",
    "héllo naïve 日本語 λ-calculus 🙂 \u00a0nbsp\r\nwindows line",
    "",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 300-piece BPE model trained on the generated test corpus."""
    root = tmp_path_factory.mktemp("sp")
    folder = write_corpus(root / "corpus")
    out = root / "bpe300.model"
    train_on_source(str(folder), out, vocab_size=300, cache_dir=root / "cache")
    return out


def test_byte_tokenizer_is_utf8_plus_an_end_of_document_id():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod_id) == (257, 256)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        np.testing.assert_array_equal(tok.encode_batch([text])[0], tok.encode(text))
    assert tok.decode([104, 105, 256, 33]) == "hi!"  # the end-of-document id has no text


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trained_locally_round_trips_exactly(tmp_path, model_type):
    lines = [line for text in TEXTS * 50 for line in text.split("\n") if line.strip()]
    tok = train_sentencepiece(lines + ["retention decay chunk"] * 100, tmp_path / "m.model",
                              vocab_size=305, model_type=model_type)
    assert tok.vocab_size == 305 and 0 <= tok.eod_id < 305
    for text in TEXTS + ["unseen: Ωmega ∑ 🚀 \x00 control"]:  # unseen characters fall back to bytes
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_model_file_loads_the_same_tokenizer(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 300
    again = pickle.loads(pickle.dumps(tok))
    assert again.fingerprint == tok.fingerprint
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert again.encode(text) == tok.encode(text)
        np.testing.assert_array_equal(tok.encode_batch([text])[0], tok.encode(text))
    assert tok.decode(tok.encode("state") + [tok.eod_id]) == "state"


def test_training_is_deterministic(tmp_path):
    lines = [f"line {i} of retention decay" for i in range(300)]
    a = train_sentencepiece(lines, tmp_path / "a.model", vocab_size=300)
    b = train_sentencepiece(lines, tmp_path / "b.model", vocab_size=300)
    assert a.fingerprint == b.fingerprint


def test_default_and_named_tokenizers():
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = ByteTokenizer()
    assert load_tokenizer(tok) is tok


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    folder = write_corpus(tmp_path / "corpus", n_files=30)
    out = tmp_path / "cli.model"
    code = main(["tokenizer", "train", "--data", str(folder), "--vocab-size", "290", "--out",
                 str(out), "--model-type", "unigram", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0 and "trained" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.vocab_size == 290 and tok.decode(tok.encode("chunk state")) == "chunk state"


@pytest.mark.parametrize("argv, names", [
    (["--data", "/no/such/folder", "--vocab-size", "300"], "source"),
    (["--data", "default", "--vocab-size", "100"], "vocab_size"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, names):
    code = main(["tokenizer", "train", *argv, "--out", str(tmp_path / "m.model"),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and names in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # refused before any preparation
