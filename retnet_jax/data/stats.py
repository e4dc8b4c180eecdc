"""What a corpus split holds: documents, UTF-8 bytes, tokens and the entropy of its bytes."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from retnet_jax.data.cache import cache_root
from retnet_jax.data.sources import Source, open_documents, parse_source
from retnet_jax.data.token_stream import token_stream
from retnet_jax.data.tokenizers import Tokenizer, load_tokenizer

DOCUMENTS_PER_READ = 256


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    """`tokens` counts the token stream: each document's tokens plus its end-of-document id.

    `byte_entropy_nats` is the entropy of the split's byte unigram distribution, in nats per byte:
    what a model that knows only byte frequencies would pay per byte.
    """

    documents: int
    bytes: int
    tokens: int
    byte_entropy_nats: float


def corpus_stats(
    source: str | os.PathLike | Source,
    split: str,
    *,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> CorpusStats:
    """Statistics of `source`'s `split` (same sources as `lm_dataset`; tokens of `tokenizer`)."""
    spec = parse_source(source)
    tokenizer = load_tokenizer(tokenizer)
    documents = open_documents(spec, split, cache_dir)
    counts_256 = np.zeros(256, np.int64)
    for start in range(0, len(documents), DOCUMENTS_PER_READ):
        for text in documents.texts(start, min(start + DOCUMENTS_PER_READ, len(documents))):
            counts_256 += np.bincount(np.frombuffer(text.encode("utf-8"), np.uint8), minlength=256)
    total = int(counts_256.sum())
    p = counts_256[counts_256 > 0] / max(total, 1)
    return CorpusStats(
        documents=len(documents),
        bytes=total,
        tokens=len(token_stream(documents, tokenizer, cache_root(cache_dir))),
        byte_entropy_nats=float(-(p * np.log(p)).sum()),
    )
