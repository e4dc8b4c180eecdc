"""Data for language modelling: tokenizers, sources (local text, TFDS, the default corpus), pipeline.

Importing this package imports grain, tensorflow-datasets and sentencepiece (never TensorFlow);
`import retnet_jax` alone does not.

    from retnet_jax.data import lm_dataset
    batches = lm_dataset("default", "train", seq_len=2048, batch_size=8)
    batch = next(batches)               # {"inputs": int32 [8, 2048], "targets": int32 [8, 2048]}
    state = batches.get_state()         # a small JSON-serialisable dict; batches.set_state(state)
"""

from retnet_jax.data.cache import cache_root
from retnet_jax.data.pipeline import LMIterator, lm_dataset
from retnet_jax.data.sources import DefaultCorpus, TextFiles, TfdsDataset, parse_source
from retnet_jax.data.stats import CorpusStats, corpus_stats
from retnet_jax.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from retnet_jax.data.tokenizer_training import train_on_source, train_sentencepiece

__all__ = [
    "ByteTokenizer",
    "CorpusStats",
    "DefaultCorpus",
    "LMIterator",
    "SentencePieceTokenizer",
    "TextFiles",
    "TfdsDataset",
    "Tokenizer",
    "cache_root",
    "corpus_stats",
    "lm_dataset",
    "load_tokenizer",
    "parse_source",
    "train_on_source",
    "train_sentencepiece",
]
