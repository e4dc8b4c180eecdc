"""Generation: a parallel or chunkwise prefill of the prompt, then O(1)-per-token recurrent decoding.

The whole loop is one compiled function (`jax.lax.scan` over new tokens), so a decode step costs no
Python: `nnx.jit`-style dispatch per token would cost more than the step itself on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from retnet_jax.model import RetNet, check_tokens
from retnet_jax.ops import RetentionState


def sample_logits(logits_bv: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    """Next tokens `[B]` from logits `[B, vocab]`: greedy when `temperature == 0`, else a draw from
    `softmax(logits / temperature)` restricted to the `top_k` largest logits (all when None)."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_largest_b = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_largest_b, -jnp.inf, logits_bv)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k",
                                              "prefill_mode"))
def _generate(graphdef, params, prompt_bt, key, *, max_new_tokens, temperature, top_k, prefill_mode):
    model = nnx.merge(graphdef, params)
    logits_btv, state = model(prompt_bt, mode=prefill_mode)
    keys = jax.random.split(key, max_new_tokens)
    first_b = sample_logits(logits_btv[:, -1], keys[0], temperature, top_k)

    def step(carry, key_t):
        token_b, state = carry
        logits_b1v, state = model(token_b[:, None], mode="recurrent", state=state)
        next_b = sample_logits(logits_b1v[:, 0], key_t, temperature, top_k)
        return (next_b, state), next_b

    (_, state), rest_tb = jax.lax.scan(step, (first_b, state), keys[1:])
    tokens_bt = jnp.concatenate([first_b[:, None], rest_tb.T], axis=1)
    return tokens_bt, state


def generate(
    model: RetNet,
    prompt_bt: jax.Array,
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    prefill_mode: str = "chunkwise",
) -> tuple[jax.Array, RetentionState]:
    """Continue each prompt by `max_new_tokens` tokens.

    Args:
      model: a `RetNet`.
      prompt_bt: int token ids `[B, T]`; every row is a prompt of the same length T.
      max_new_tokens: how many tokens to generate (>= 1).
      key: PRNG key for sampling (required when `temperature > 0`).
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_k: sample only among the k most likely tokens (None: all).
      prefill_mode: "chunkwise" (linear in T) or "parallel" for the prompt.

    Returns:
      `(tokens [B, max_new_tokens] int32, state)`: the state after the last generated token was
      *predicted* (it has consumed the prompt and all but the last new token), so
      `model(tokens[:, -1:], mode="recurrent", state=state)` continues the sequence.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k must lie in [1, vocab_size={model.cfg.vocab_size}], got {top_k}")
    if prefill_mode not in ("chunkwise", "parallel"):
        raise ValueError(f"prefill_mode must be 'chunkwise' or 'parallel', got {prefill_mode!r}")
    if temperature > 0 and key is None:
        raise ValueError("key is required when temperature > 0 (sampling)")
    prompt_bt = check_tokens(prompt_bt, model.cfg.vocab_size)
    graphdef, params = nnx.split(model)
    return _generate(
        graphdef, params, prompt_bt.astype(jnp.int32),
        jax.random.key(0) if key is None else key,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
        prefill_mode=prefill_mode)
