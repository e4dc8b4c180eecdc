"""Training SentencePiece models locally, on any source's text (nothing is downloaded)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from retnet_jax.data.sources import Source, check_split, open_documents, parse_source
from retnet_jax.data.tokenizers import SentencePieceTokenizer

MODEL_TYPES = ("bpe", "unigram")
MIN_VOCAB_SIZE = 260  # 256 byte pieces, <unk>, <s>, </s> and at least one learned piece
DOCUMENTS_PER_READ = 256


def train_sentencepiece(
    lines: Iterable[str],
    out: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    max_lines: int = 1_000_000,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train a SentencePiece model on `lines` (a sample of at most `max_lines`); write it to `out`.

    Text is kept as it is (no normalisation, whitespace pieces allowed) and characters outside the
    vocabulary fall back to their bytes, so decoding gives back exactly the text encoded.
    """
    out = _check_training_arguments(out, vocab_size, model_type, max_lines)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the line sample, so the same lines give the same model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            byte_fallback=True, split_digits=True, input_sentence_size=max_lines,
            shuffle_input_sentence=True, max_sentence_length=1 << 14, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as err:  # e.g. more pieces asked for than the text holds
        raise ValueError(f"vocab_size={vocab_size}: SentencePiece training failed: {err}") from None
    tokenizer = SentencePieceTokenizer(model.getvalue(), name=repr(str(out)))
    out.write_bytes(model.getvalue())
    return tokenizer


def train_on_source(
    source: str | os.PathLike | Source,
    out: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    max_lines: int = 1_000_000,
    cache_dir: str | os.PathLike | None = None,
) -> SentencePieceTokenizer:
    """`train_sentencepiece` on the non-blank lines of `source`'s train split."""
    _check_training_arguments(out, vocab_size, model_type, max_lines)
    spec = parse_source(source)
    check_split(spec, "train")
    return train_sentencepiece(_lines(spec, cache_dir), out, vocab_size=vocab_size,
                               model_type=model_type, max_lines=max_lines)


def _lines(spec: Source, cache_dir) -> Iterator[str]:
    documents = open_documents(spec, "train", cache_dir)
    for start in range(0, len(documents), DOCUMENTS_PER_READ):
        for text in documents.texts(start, min(start + DOCUMENTS_PER_READ, len(documents))):
            yield from (line for line in text.split("\n") if line.strip())


def _check_training_arguments(out, vocab_size: int, model_type: str, max_lines: int) -> Path:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte pieces and "
                         f"specials), got {vocab_size}")
    if max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out: no folder {str(out.parent)!r} to write the model into")
    return out
