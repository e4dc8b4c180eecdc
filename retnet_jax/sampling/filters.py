"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus), all traced values.

The settings are arrays, not Python constants, so one compiled decode loop serves every setting: a
new temperature does not recompile. `lax.cond` keeps the cheap paths cheap at run time: greedy is an
argmax, and the `[B, vocab]` sort behind top-k and top-p runs only when one of them is on.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampling(NamedTuple):
    """Traced sampling settings (a pytree of scalars).

    temperature: float32; 0 means greedy (argmax), otherwise logits are divided by it.
    top_k: int32 in [1, vocab]; vocab means no top-k cut.
    top_p: float32 in (0, 1]; 1 means no nucleus cut.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def check_sampling(temperature, top_k, top_p, vocab_size: int) -> Sampling:
    """Validate the user's settings (a `ValueError` naming the argument) and make them traced values.
    `top_k=None` and `top_p=None` switch those cuts off."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is None:
        top_k = vocab_size
    elif isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be an int in [1, vocab_size] = [1, {vocab_size}] (or None), "
                         f"got {top_k!r}")
    if top_p is None:
        top_p = 1.0
    elif isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (or be None), got {top_p!r}")
    return Sampling(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def cut_threshold(scaled_bv: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The smallest logit `[B, 1]` that survives top-k then top-p on `scaled_bv` (temperature applied).

    Top-p keeps the fewest most likely tokens, among the top k, whose probabilities (renormalised
    over the top k) sum to at least `top_p`: token j of the descending order is kept when the mass
    before it is below `top_p`, so the most likely token always is. Tokens tied with the threshold
    are all kept.
    """
    vocab = scaled_bv.shape[-1]
    sorted_bv = -jnp.sort(-scaled_bv, axis=-1)  # descending
    in_top_k_v = jnp.arange(vocab) < top_k
    probs_bv = jax.nn.softmax(jnp.where(in_top_k_v, sorted_bv, -jnp.inf), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    kept_b = jnp.sum(in_top_k_v & (mass_before_bv < top_p), axis=-1)  # >= 1
    return jnp.take_along_axis(sorted_bv, kept_b[:, None] - 1, axis=-1)


def filtered_logits(logits_bv: jax.Array, sampling: Sampling) -> jax.Array:
    """`logits / temperature` with every token outside the top-k / top-p set at -inf (temperature
    > 0). The distribution sampled is `softmax` of this: the renormalised nucleus."""
    scaled_bv = logits_bv.astype(jnp.float32) / sampling.temperature
    vocab = scaled_bv.shape[-1]

    def cut(scaled_bv):
        threshold_b1 = cut_threshold(scaled_bv, sampling.top_k, sampling.top_p)
        return jnp.where(scaled_bv < threshold_b1, -jnp.inf, scaled_bv)

    cutting = (sampling.top_k < vocab) | (sampling.top_p < 1.0)
    return jax.lax.cond(cutting, cut, lambda s: s, scaled_bv)


def choose_tokens(logits_bv: jax.Array, keys_b: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens int32 `[B]`: the argmax when `temperature == 0`, else one draw per row from
    `softmax(filtered_logits)` with that row's key (`keys_b`: `[B]` PRNG keys)."""
    def draw(logits_bv):
        return jax.vmap(jax.random.categorical)(keys_b, filtered_logits(logits_bv, sampling))

    def greedy(logits_bv):
        return jnp.argmax(logits_bv, axis=-1)

    return jax.lax.cond(sampling.temperature > 0, draw, greedy, logits_bv).astype(jnp.int32)
