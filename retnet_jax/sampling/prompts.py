"""Ragged prompts on the host: validation, padding, and the prompt tokens each decode step must feed.

Prompts of different lengths are decoded exactly, without padding ever reaching the model: the
prefix every prompt has (the shortest prompt's length) is prefilled at once, and each longer prompt's
remaining tokens are fed one per decode step, *forced* instead of sampled, while the shorter ones
already generate. Every sequence sits at its own position throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np


class Prompts(NamedTuple):
    """tokens_bt: int32 `[B, T]`, each row a prompt right-padded to the longest (pad values are never
    fed to the model); lengths_b: int32 `[B]`, every length >= 1."""

    tokens_bt: np.ndarray
    lengths_b: np.ndarray

    @property
    def prefix(self) -> int:
        """Tokens every prompt has: what the prefill consumes."""
        return int(self.lengths_b.min())

    @property
    def start_b(self) -> np.ndarray:
        """The decode step at which each sequence samples its first new token."""
        return self.lengths_b - self.prefix


def as_prompts(prompts, lengths=None, *, vocab_size: int) -> Prompts:
    """Validate `prompts` and lay them out as `Prompts`.

    prompts: a sequence of token-id sequences of any lengths (lists, NumPy or JAX arrays); a single
      sequence of ints (one prompt); or a 2-D int array `[B, T]`, every row a whole prompt unless
      `lengths` (`[B]`) says how many of its leading tokens are the prompt.
    Raises ValueError, naming `prompts` or `lengths`, for no prompt, an empty prompt, non-integer ids
    or ids outside `[0, vocab_size)`.
    """
    rows = _rows(prompts, lengths)
    if not rows:
        raise ValueError("prompts must hold at least one prompt, got none")
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        low, high = int(row.min()), int(row.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"prompts[{i}] holds ids outside the vocabulary [0, {vocab_size}): "
                             f"ids in [{low}, {high}]")
    lengths_b = np.asarray([row.size for row in rows], np.int32)
    tokens_bt = np.zeros((len(rows), int(lengths_b.max())), np.int32)
    for i, row in enumerate(rows):
        tokens_bt[i, :row.size] = row
    return Prompts(tokens_bt, lengths_b)


def _rows(prompts, lengths) -> list[np.ndarray]:
    """The prompts as a list of 1-D integer arrays."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        array = np.asarray(prompts)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise ValueError(f"prompts as an array must have shape [B, T] (or [T]), got {array.shape}")
        rows = list(array)
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        if prompts and all(_is_int(x) for x in prompts):
            prompts = [prompts]  # one prompt given as a flat sequence of ids
        rows = [np.asarray(row) for row in prompts]
    else:
        raise ValueError(f"prompts must be a list of token-id sequences or an int array [B, T], "
                         f"got {type(prompts).__name__} (encode text with a tokenizer first)")
    for i, row in enumerate(rows):
        if row.ndim != 1 or (row.size and not np.issubdtype(row.dtype, np.integer)):
            raise ValueError(f"prompts[{i}] must be a 1-D sequence of integer token ids, got "
                             f"{row.dtype} with shape {row.shape}")
    if lengths is None:
        return [row.astype(np.int32) for row in rows]
    lengths = np.asarray(lengths)
    if lengths.shape != (len(rows),) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be {len(rows)} ints (one per prompt), got {lengths.dtype} "
                         f"with shape {lengths.shape}")
    width = rows[0].size if rows else 0
    if lengths.size and (lengths.min() < 0 or lengths.max() > width):
        raise ValueError(f"lengths must lie in [0, {width}] (the prompts' width), got {lengths.tolist()}")
    return [row[:n].astype(np.int32) for row, n in zip(rows, lengths)]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def forced_tokens(prompts: Prompts, first_step: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompt tokens decode steps `first_step ... first_step + steps - 1` feed instead of sampling:
    `(tokens_bk int32, forced_bk bool)`, both `[B, steps]`. Step s of sequence b feeds its prompt's
    token at position `prefix + s` while that position lies inside the prompt."""
    position_k = prompts.prefix + first_step + np.arange(steps)
    forced_bk = position_k[None, :] < prompts.lengths_b[:, None]
    width = prompts.tokens_bt.shape[1]
    tokens_bk = prompts.tokens_bt[:, np.minimum(position_k, width - 1)]
    return np.where(forced_bk, tokens_bk, 0).astype(np.int32), forced_bk
