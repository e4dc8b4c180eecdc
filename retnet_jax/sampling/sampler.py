"""`generate` and `stream`: continue prompts of any lengths with RetNet or the Transformer baseline.

A prefill of the prefix all prompts share, then blocks of compiled decode steps (`decode.py`) in
which longer prompts feed their remaining tokens while shorter ones generate. `generate` runs blocks
of `GENERATE_BLOCK` steps, `stream` of a few, and both stop calling once every sequence has
stopped; their tokens are the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax.layer_stack import stack_state, unstack_blocks
from retnet_jax.sampling import decode, states
from retnet_jax.sampling.decode import DecodeCarry
from retnet_jax.sampling.filters import Sampling, check_sampling
from retnet_jax.sampling.prompts import Prompts, as_prompts, forced_tokens

GENERATE_BLOCK = 64  # decode steps per compiled call in generate (one host check per block)
STREAM_BLOCK = 4  # in stream: tokens reach the caller every few steps
CAPACITY_MULTIPLE = 256  # default KV cache capacities are rounded up to this (fewer recompilations)
PREFILL_MODES = ("chunkwise", "parallel")


class Generation(NamedTuple):
    """tokens_bn: int32 `[B, max_new_tokens]`, each sequence's new tokens, `pad_id` after its count.
    counts_b: int32 `[B]`, tokens each sequence generated (fewer than asked when it met `eos_id`).
    state: the model's state after each prompt and all its generated tokens (the end-of-sequence
    token included): sequence b sits at position `len(prompts[b]) + counts_b[b]`."""

    tokens_bn: jax.Array
    counts_b: jax.Array
    state: Any


class _Run(NamedTuple):
    """A validated request, prefilled: everything the decode blocks need."""

    graphdef: Any  # the model with unstacked layers (`unstack_blocks`), split
    params: Any
    prompts: Prompts
    keys_b: jax.Array
    max_new: jax.Array
    sampling: Sampling
    eos_id: jax.Array
    hold: bool  # whether sequences can stop at different steps (decode_block's `hold`)


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, key: jax.Array | None = None,
             eos_id: int | None = None, pad_id: int = 0, prefill: str = "chunkwise",
             chunk_size: int | None = None, lengths=None, capacity: int | None = None) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
      model: a `RetNet` or a `retnet_jax.baselines.Transformer`.
      prompts: token-id sequences of any lengths (a list of lists or arrays), or an int array
        `[B, T]` with optional `lengths` `[B]` (tokens of each row that are prompt; the rest is
        ignored). Each sequence decodes at its own position: padding never changes any output.
      max_new_tokens: tokens to generate per sequence (>= 1).
      temperature: 0 for greedy (argmax) decoding, else the softmax temperature.
      top_k: sample among the k most likely tokens only (None: all).
      top_p: nucleus sampling: among the fewest most likely tokens whose probability sums to at
        least `top_p` (None or 1: all). Temperature, top-k and top-p are traced values: changing
        them does not recompile.
      seed, key: the randomness of sampling: `key` (a PRNG key, or `[B]` keys, one per sequence) if
        given, else `jax.random.key(seed)`. One key is split into one per sequence; sequence b's
        j-th token draws with `fold_in(key_b, j)`, so a prompt gives the same sample with the same
        key alone or in any batch.
      eos_id: a sequence stops after generating this id (None: never); later positions hold `pad_id`.
      prefill: "chunkwise" (linear in the prompt length) or "parallel" for the shared prompt prefix.
      chunk_size: the chunkwise prefill's chunk length (None: the model's `cfg.chunk_size`).
      capacity: the Transformer's KV cache capacity in tokens (None: the longest prompt plus
        `max_new_tokens`, rounded up to a multiple of 256); ignored by RetNet.

    Returns:
      `Generation(tokens_bn, counts_b, state)`. Decoding stops as soon as every sequence has stopped.
    """
    run, carry = _start(model, prompts, lengths=lengths, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, key=key,
                        eos_id=eos_id, prefill_mode=prefill, chunk_size=chunk_size, capacity=capacity)
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
        raise ValueError(f"pad_id must be an int, got {pad_id!r}")
    batch = run.prompts.lengths_b.size
    tokens_bn = np.full((batch, max_new_tokens), pad_id, np.int32)
    for carry, new_bk, before_b, after_b in _blocks(run, carry, GENERATE_BLOCK):
        for b in range(batch):
            tokens_bn[b, before_b[b]:after_b[b]] = new_bk[b, :after_b[b] - before_b[b]]
    return Generation(jnp.asarray(tokens_bn), carry.count_b, stack_state(carry.state))


def stream(model, prompts, *, max_new_tokens: int, block_steps: int = STREAM_BLOCK,
           **settings) -> Iterator[tuple[np.ndarray, ...]]:
    """`generate`'s decoding as an iterator: after every `block_steps` decode steps (one compiled
    call), yields a tuple of B int32 arrays, each sequence's tokens generated in those steps (possibly
    none). Concatenated, each sequence's pieces are `generate`'s `tokens_bn[b, :counts_b[b]]`.
    `settings`: any other keyword argument of `generate`."""
    if isinstance(block_steps, bool) or not isinstance(block_steps, int) or block_steps < 1:
        raise ValueError(f"block_steps must be a positive int, got {block_steps!r}")
    settings.pop("pad_id", None)  # nothing is padded here
    prefill_mode = settings.pop("prefill", "chunkwise")
    # Validated and prefilled now, not at the first `next`: a bad argument fails at the call.
    run, carry = _start(model, prompts, max_new_tokens=max_new_tokens, prefill_mode=prefill_mode,
                        **settings)
    return (tuple(new_bk[b, :after_b[b] - before_b[b]] for b in range(new_bk.shape[0]))
            for _, new_bk, before_b, after_b in _blocks(run, carry, block_steps))


def _blocks(run: _Run, carry: DecodeCarry, block_steps: int):
    """Decode blocks until every sequence has stopped, yielding `(carry, new_bk, count before,
    count after)` per block (host arrays but the carry)."""
    before_b = np.zeros(run.prompts.lengths_b.shape, np.int32)
    first_step = 0
    while True:
        tokens_bk, forced_bk = forced_tokens(run.prompts, first_step, block_steps)
        carry, new_bk = decode.decode_block(run.graphdef, run.params, carry, tokens_bk, forced_bk,
                                            run.keys_b, run.max_new, run.sampling, run.eos_id,
                                            hold=run.hold)
        after_b, done_b = np.asarray(carry.count_b), np.asarray(carry.done_b)
        yield carry, np.asarray(new_bk), before_b, after_b
        if done_b.all():
            return
        before_b, first_step = after_b, first_step + block_steps


def _start(model, prompts, *, lengths=None, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
           seed=0, key=None, eos_id=None, prefill_mode="chunkwise", chunk_size=None, capacity=None
           ) -> tuple[_Run, DecodeCarry]:
    """Validate a request (ValueError naming the argument) and prefill the shared prompt prefix."""
    vocab_size = model.cfg.vocab_size
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or (
            max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    sampling = check_sampling(temperature, top_k, top_p, vocab_size)
    if prefill_mode not in PREFILL_MODES:
        raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill_mode!r}")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer))
                               or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be None or an id in [0, {vocab_size}), got {eos_id!r}")
    prompts = as_prompts(prompts, lengths, vocab_size=vocab_size)
    batch = prompts.lengths_b.size
    needed = int(prompts.lengths_b.max()) + int(max_new_tokens)
    if capacity is None:
        capacity = CAPACITY_MULTIPLE * math.ceil(needed / CAPACITY_MULTIPLE)
    decoder = unstack_blocks(model)  # layers one by one for decoding (read and updated in place)
    state = decoder.init_state(batch, capacity)
    room = states.capacity(state)
    if room is not None and room < needed:
        raise ValueError(f"capacity: a KV cache of {room} tokens cannot hold the longest prompt "
                         f"({int(prompts.lengths_b.max())} tokens) plus max_new_tokens={max_new_tokens}; "
                         f"pass capacity >= {needed}")
    graphdef, params = nnx.split(model)
    carry = decode.prefill(graphdef, params, jnp.asarray(prompts.tokens_bt[:, :prompts.prefix]), state,
                    mode=prefill_mode, chunk_size=chunk_size)
    ragged = prompts.lengths_b.min() != prompts.lengths_b.max()
    graphdef, params = nnx.split(decoder)
    run = _Run(graphdef, params, prompts, _sequence_keys(seed, key, batch), jnp.int32(max_new_tokens),
               sampling, jnp.int32(-1 if eos_id is None else eos_id),
               hold=batch > 1 and (eos_id is not None or bool(ragged)))
    return run, carry


def _sequence_keys(seed, key, batch: int) -> jax.Array:
    """`[B]` typed PRNG keys: `key` split per sequence, or taken as given when it is already `[B]`."""
    if key is None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        key = jax.random.key(int(seed))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
            raise ValueError(f"key must be a PRNG key (jax.random.key) or [B] keys, got {key.dtype}"
                             f"{tuple(key.shape)}")
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.random.split(key, batch)
    if key.shape == (batch,):
        return key
    raise ValueError(f"key must be one PRNG key or one per sequence ({batch}), got shape {key.shape}")
