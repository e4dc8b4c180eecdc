"""The compiled halves of generation: a prefill, and a block of decode steps in one `lax.while_loop`.

Both are `jax.jit` functions of `nnx.split(model)`'s graph and parameters (dispatching the model's
Python per token would cost more than a decode step on a CPU). The prefill runs the model as built
(layers stacked, one scan) and hands over the state as a list of per-layer states; the decode steps
run the model with unstacked layers (`layer_stack.unstack_blocks`), each layer's weights and state
read and updated in place. Nothing about them depends on how
many tokens are asked for or how long the context is: the number of new tokens is a traced value,
and the prompt tokens still to feed come a block at a time, in arrays of the block's size. So one
compilation of `decode_block` serves every request of a batch size and block size (and, for the
Transformer, cache capacity); `prefill` compiles once per prompt-prefix length.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from retnet_jax.layer_stack import stack_state, unstack_state
from retnet_jax.sampling.filters import Sampling, choose_tokens
from retnet_jax.sampling.states import hold_finished


class DecodeCarry(NamedTuple):
    """What one block of decode steps hands the next (a pytree; donated between blocks).

    state: the model's state (`RetentionState`s or `KVCache`s), a list of one per layer, every
      sequence at its own position.
    logits_bv: float32 `[B, vocab]`, each sequence's logits for its next token.
    count_b: int32 `[B]`, tokens generated so far.
    done_b: bool `[B]`, sequences that have stopped (end-of-sequence id, or `max_new` tokens).
    """

    state: Any
    logits_bv: jax.Array
    count_b: jax.Array
    done_b: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "chunk_size"), donate_argnames="state")
def prefill(graphdef, params, tokens_bt: jax.Array, state, *, mode: str, chunk_size: int | None
            ) -> DecodeCarry:
    """Consume `tokens [B, T]` from `state` (a list of per-layer states, as `decode_block` takes; a
    stacked one is accepted too) in `mode` ("chunkwise" or "parallel") with the stacked model
    (`graphdef, params`); only the last position's logits are computed (`last_only`): no
    `[B, T, vocab]` array is formed."""
    model = nnx.merge(graphdef, params)
    logits_b1v, state = model(tokens_bt, mode=mode, state=stack_state(state), chunk_size=chunk_size,
                              last_only=True)
    batch = tokens_bt.shape[0]
    return DecodeCarry(unstack_state(state), logits_b1v[:, 0], jnp.zeros((batch,), jnp.int32),
                       jnp.zeros((batch,), bool))


@functools.partial(jax.jit, static_argnames=("graphdef", "hold"), donate_argnames="carry")
def decode_block(graphdef, params, carry: DecodeCarry, forced_tokens_bk: jax.Array,
                 forced_bk: jax.Array, keys_b: jax.Array, max_new: jax.Array, sampling: Sampling,
                 eos_id: jax.Array, *, hold: bool = True) -> tuple[DecodeCarry, jax.Array]:
    """Up to K = `forced_bk.shape[1]` decode steps, ending early once every sequence has stopped.
    `graphdef, params`: the model with unstacked layers (`nnx.split(unstack_blocks(model))`).

    Each step, each sequence still running either feeds its next prompt token (`forced_bk[:, t]`:
    it is still inside its prompt) or generates: it chooses a token from its logits, with the key
    `fold_in(keys_b[b], count_b[b])` (so a sequence's j-th token draws with the same key whatever
    the batch around it), then feeds it. A sequence stops after generating `eos_id` or its `max_new`-th
    token; its state then stays as it was (`hold_finished`), having consumed every token it generated.
    `hold=False` skips that where no sequence can stop before the others (one sequence, or prompts of
    one length and no `eos_id`: all stop at the same step): it costs a state copy per step.

    Returns `(carry, new_bk)`: int32 `[B, K]`, the tokens each sequence generated in this block,
    packed from column 0 (`carry.count_b` minus the previous count says how many; the rest is 0).
    """
    model = nnx.merge(graphdef, params)
    batch, steps = forced_bk.shape
    rows_b = jnp.arange(batch)
    count0_b = carry.count_b

    def running(loop):
        t, carry, _ = loop
        return (t < steps) & ~jnp.all(carry.done_b)

    def step(loop):
        t, carry, new_bk = loop
        active_b = ~carry.done_b
        forcing_b = forced_bk[:, t] & active_b
        generating_b = active_b & ~forcing_b
        keys_now_b = jax.vmap(jax.random.fold_in)(keys_b, carry.count_b)
        chosen_b = choose_tokens(carry.logits_bv, keys_now_b, sampling)
        # Finished sequences feed token 0 (a valid id; its effect is discarded by hold_finished).
        token_b = jnp.where(forcing_b, forced_tokens_bk[:, t], jnp.where(generating_b, chosen_b, 0))
        column_b = jnp.where(generating_b, carry.count_b - count0_b, steps)  # `steps`: dropped
        new_bk = new_bk.at[rows_b, column_b].set(chosen_b, mode="drop")
        count_b = carry.count_b + generating_b
        done_b = carry.done_b | (generating_b & ((chosen_b == eos_id) | (count_b >= max_new)))
        logits_b1v, state = model(token_b[:, None], mode="recurrent", state=carry.state)
        if hold:
            state = hold_finished(carry.state, state, active_b)
        return t + 1, DecodeCarry(state, logits_b1v[:, 0], count_b, done_b), new_bk

    new_bk = jnp.zeros((batch, steps), jnp.int32)
    _, carry, new_bk = jax.lax.while_loop(running, step, (jnp.int32(0), carry, new_bk))
    return carry, new_bk
