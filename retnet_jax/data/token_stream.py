"""A split's documents tokenized and joined, each followed by the end-of-document id, on disk.

`d0 EOD d1 EOD ... dN EOD` is written once per (documents, tokenizer) under the cache directory and
memory-mapped after that, so packing windows is slicing, a resumed run starts at once, and shuffling
never changes what a window holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from retnet_jax.data.cache import publish_file
from retnet_jax.data.sources import Documents
from retnet_jax.data.tokenizers import Tokenizer

FORMAT = "tokens/2"  # bump when the layout of a stream file changes
DOCUMENTS_PER_CHUNK = 256  # tokenized together (SentencePiece spreads a batch over threads)


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A flat file of token ids; `array()` maps it (read-only) into this process."""

    path: Path
    dtype: str
    digest: str  # sha256 of the file: the same tokens give the same digest on any machine

    def __len__(self) -> int:
        return self.path.stat().st_size // np.dtype(self.dtype).itemsize

    def array(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r")


def token_stream(documents: Documents, tokenizer: Tokenizer, cache: Path) -> TokenStream:
    """The split's token stream, tokenized now unless this (documents, tokenizer) already was."""
    key = hashlib.sha256(
        f"{FORMAT}|{documents.fingerprint}|{tokenizer.fingerprint}".encode()).hexdigest()
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    path = cache / "tokens" / f"{key[:32]}.{dtype}"
    digest_path = path.with_name(path.name + ".sha256")

    def build(tmp: Path) -> None:
        digest = _write(documents, tokenizer, np.dtype(dtype), tmp)
        # Published before the stream itself, so a stream on disk always has its digest.
        publish_file(digest_path, lambda tmp_digest: tmp_digest.write_text(digest))

    publish_file(path, build)
    return TokenStream(path, dtype, digest_path.read_text())


def _write(documents: Documents, tokenizer: Tokenizer, dtype: np.dtype, out: Path) -> str:
    """Writes the stream to `out`; returns the sha256 of what it wrote."""
    eod = np.asarray([tokenizer.eod_id], dtype)
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for start in range(0, len(documents), DOCUMENTS_PER_CHUNK):
            texts = documents.texts(start, min(start + DOCUMENTS_PER_CHUNK, len(documents)))
            ids = tokenizer.encode_batch(texts)
            top = max((int(x.max()) for x in ids if x.size), default=0)
            if top >= tokenizer.vocab_size:  # it would wrap around in the narrow on-disk dtype
                raise ValueError(f"tokenizer {tokenizer!r} produced id {top} >= its vocab_size "
                                 f"{tokenizer.vocab_size}")
            joined = np.concatenate([part for x in ids for part in (x.astype(dtype), eod)]).tobytes()
            digest.update(joined)
            f.write(joined)
    return digest.hexdigest()
