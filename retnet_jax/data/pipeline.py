"""The language-modelling pipeline: fixed windows of the token stream, shuffled, batched, per process.

Window `i` is tokens `[i*L, i*L + L]` of the split's stream (L + 1 tokens: inputs and the targets one
token later), so one epoch's windows hold every token once except the final remainder. grain shuffles
window indices (a fresh permutation each epoch, from the seed), repeats, and groups them into global
batches of `batch_size`; process `p` of `P` reads rows `[p*B/P, (p+1)*B/P)` of each, so hosts read
disjoint windows and the iterator state (a global batch count) means the same on every host.
"""

from __future__ import annotations

import operator
import os
import weakref
from typing import Any

import grain
import numpy as np

from retnet_jax.data.cache import cache_root
from retnet_jax.data.sources import Source, check_split, open_documents, parse_source
from retnet_jax.data.token_stream import TokenStream, token_stream
from retnet_jax.data.tokenizers import Tokenizer, load_tokenizer

# Reading a batch is one slice per row of a memory-mapped file: two threads keep ahead of any
# training step on this machine, and a short queue keeps the iterator's memory small.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


class WindowBatch:
    """Global batch of window indices `[B]` -> this process's rows: int32 `inputs`, `targets` [b, L]."""

    def __init__(self, stream: TokenStream, seq_len: int, rows: slice):
        self.stream, self.seq_len, self.rows = stream, seq_len, rows
        self._tokens = None

    def __call__(self, windows_b: np.ndarray) -> dict[str, np.ndarray]:
        if self._tokens is None:  # mapped lazily: in each worker process, not pickled across
            self._tokens = self.stream.array()
        length = self.seq_len
        rows_bl = np.stack([self._tokens[i * length: i * length + length + 1]
                            for i in windows_b[self.rows]]).astype(np.int32)
        return {"inputs": np.ascontiguousarray(rows_bl[:, :-1]),
                "targets": np.ascontiguousarray(rows_bl[:, 1:])}

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


class LMIterator:
    """Batches `{"inputs", "targets"}` (int32 [batch_size // process_count, seq_len]), resumable.

    `get_state()` is a small JSON-serialisable dict; `set_state` of it on an iterator built over the
    same tokens (same text and tokenizer, prepared anywhere) with the same split, seq_len, batch_size,
    seed and worker_count continues with the same batches. The process index and count may differ:
    the state counts global batches.
    """

    def __init__(self, iterator, *, signature: dict[str, Any], tokenizer: Tokenizer,
                 num_windows: int, batches_per_epoch: int):
        self._iterator = iterator
        self._signature = signature
        self._from_workers = signature["worker_count"] > 0
        # Close grain's threads and worker processes at exit while modules still exist (from
        # __del__ during interpreter teardown, grain raises and leaks shared memory).
        self._closer = weakref.finalize(self, iterator.close)
        self.tokenizer = tokenizer
        self.num_windows = num_windows
        self.batches_per_epoch = batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        if self._from_workers:  # plain arrays, so grain's shared memory is freed at once
            batch = {name: np.array(x) for name, x in batch.items()}
        return batch

    def close(self) -> None:
        """Stop reading ahead (threads, worker processes); the iterator is done after this."""
        self._closer()

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": dict(self._signature), "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"pipeline", "grain"} <= state.keys():
            raise ValueError("state must be a dict returned by LMIterator.get_state()")
        differ = {k: (state["pipeline"].get(k), v) for k, v in self._signature.items()
                  if state["pipeline"].get(k) != v}
        if differ:
            raise ValueError(f"state was saved by a different pipeline; (saved, this) differ in: "
                             f"{differ}")
        self._iterator.set_state(state["grain"])


def lm_dataset(
    source: str | os.PathLike | Source,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    cache_dir: str | os.PathLike | None = None,
    worker_count: int = 0,
) -> LMIterator:
    """Language-model batches of `source`'s `split`: `{"inputs", "targets"}`, int32 [B/P, seq_len].

    `source`: "default" (the Python standard library), a file, folder or glob of text, or
    "tfds:NAME[/CONFIG][#FEATURE]" (or a `DefaultCorpus`, `TextFiles`, `TfdsDataset`). `split`:
    "train" is shuffled (a new permutation each epoch) and repeats forever; any other split is read
    once, in order, and its last incomplete batch dropped. `batch_size` is the global batch: each of
    the `process_count` processes gets `batch_size // process_count` rows. `tokenizer`: None (bytes),
    a SentencePiece model file or a `Tokenizer`. `worker_count` > 0 reads in grain worker processes.
    Local text and token streams are prepared once under `cache_dir` (see `cache.cache_root`).
    """
    _check_arguments(seq_len=seq_len, batch_size=batch_size, seed=seed,
                     process_index=process_index, process_count=process_count,
                     worker_count=worker_count)
    spec = parse_source(source)
    check_split(spec, split)
    tokenizer = load_tokenizer(tokenizer)
    documents = open_documents(spec, split, cache_dir)
    stream = token_stream(documents, tokenizer, cache_root(cache_dir))

    num_windows = (len(stream) - 1) // seq_len
    if num_windows == 0:
        raise ValueError(f"seq_len={seq_len}: the {split} split holds {len(stream)} tokens, fewer "
                         f"than the seq_len + 1 one window needs")
    training = split.partition("[")[0] == "train"
    if not training and num_windows < batch_size:
        raise ValueError(f"batch_size={batch_size}: the {split} split holds {num_windows} windows "
                         f"of seq_len={seq_len}, less than one batch")

    windows = grain.MapDataset.range(num_windows)
    if training:
        windows = windows.shuffle(seed=seed).repeat()
    rows = process_index * (batch_size // process_count)
    batches = (windows.batch(batch_size, drop_remainder=True)
               .map(WindowBatch(stream, seq_len, slice(rows, rows + batch_size // process_count)))
               .to_iter_dataset(READ_OPTIONS))
    if worker_count:
        _allow_grain_workers()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    # What the saved position means: the same tokens, windows, batches and order. Content, not
    # paths or file times, so a state saved on one host resumes on another with the same data.
    signature = {"tokens": stream.digest, "split": split, "seq_len": seq_len,
                 "batch_size": batch_size, "seed": seed, "worker_count": worker_count}
    return LMIterator(iter(batches), signature=signature, tokenizer=tokenizer,
                      num_windows=num_windows, batches_per_epoch=num_windows // batch_size)


def _check_arguments(**values: int) -> None:
    for name, value in values.items():
        try:
            operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if values["seq_len"] < 1:
        raise ValueError(f"seq_len must be >= 1, got {values['seq_len']}")
    if values["batch_size"] < 1:
        raise ValueError(f"batch_size must be >= 1, got {values['batch_size']}")
    if values["process_count"] < 1:
        raise ValueError(f"process_count must be >= 1, got {values['process_count']}")
    if not 0 <= values["process_index"] < values["process_count"]:
        raise ValueError(f"process_index must be in [0, process_count={values['process_count']}), "
                         f"got {values['process_index']}")
    if values["batch_size"] % values["process_count"]:
        raise ValueError(f"batch_size={values['batch_size']} (the global batch) must be divisible "
                         f"by process_count={values['process_count']}")
    if values["worker_count"] < 0:
        raise ValueError(f"worker_count must be >= 0, got {values['worker_count']}")


def _allow_grain_workers() -> None:
    """grain 0.2 reads an absl flag when it starts workers, which fails unless flags were parsed
    (google/grain#1355); outside an absl app nothing will parse them, so mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
