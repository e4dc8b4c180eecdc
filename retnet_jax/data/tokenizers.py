"""Tokenizers behind one small interface: byte-level (the default) and SentencePiece.

Both are exact: `decode(encode(text)) == text` for any text (the SentencePiece models trained here
keep whitespace as it is and fall back to bytes for characters outside their vocabulary).
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm


class Tokenizer(abc.ABC):
    """`encode(str) -> list[int]`, `decode(ids) -> str`, `vocab_size` and the end-of-document id.

    `fingerprint` names the vocabulary: token streams cached on disk are keyed by it.
    """

    vocab_size: int
    eod_id: int
    fingerprint: str

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special ids (end of document) are dropped."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text, as integer arrays (subclasses do it faster)."""
        return [np.asarray(self.encode(text), np.int64) for text in texts]


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text (ids 0-255) and an end-of-document id, 256."""

    vocab_size = 257
    eod_id = 256
    fingerprint = "byte-utf8"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in (int(i) for i in ids) if i < 256)
        # A window may cut a character in two: its bytes decode to U+FFFD, not an error.
        return data.decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), np.uint8) for text in texts]

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (BPE or unigram); its `</s>` piece ends each document."""

    def __init__(self, model_proto: bytes, *, name: str = "<bytes>"):
        try:
            processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as err:
            raise ValueError(f"tokenizer: {name} is not a SentencePiece model ({err})") from None
        if processor.get_piece_size() == 0:  # an empty file parses as an empty model
            raise ValueError(f"tokenizer: {name} is not a SentencePiece model (no pieces)")
        if processor.eos_id() < 0:
            raise ValueError(f"tokenizer: {name} has no </s> piece to mark the end of a document")
        self._processor = processor
        self._name = name
        self.model_proto = model_proto
        self.vocab_size = processor.get_piece_size()
        self.eod_id = processor.eos_id()
        self.fingerprint = "sentencepiece-" + hashlib.sha256(model_proto).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: no SentencePiece model file at {str(path)!r}")
        return cls(path.read_bytes(), name=repr(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(i) for i in ids])  # </s> is a control piece: no text

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = self._processor.encode(list(texts), num_threads=os.cpu_count() or 1)
        return [np.asarray(x, np.int64) for x in ids]

    def __getstate__(self):  # the C++ processor does not pickle; the model bytes do
        return {"model_proto": self.model_proto, "name": self._name}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], name=state["name"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self._name}, vocab_size={self.vocab_size})"


def load_tokenizer(tokenizer: Tokenizer | str | os.PathLike | None) -> Tokenizer:
    """None or "byte": the byte tokenizer; a path: a SentencePiece model file; a Tokenizer: itself."""
    if tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "byte"):
        return ByteTokenizer()
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return SentencePieceTokenizer.load(tokenizer)
    raise TypeError(f"tokenizer must be None, 'byte', a model file path or a Tokenizer; got "
                    f"{type(tokenizer).__name__}")
