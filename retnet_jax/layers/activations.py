"""The activations (exact gelu, swish) with their derivatives, for `gated_projection`'s backward pass.

Its "xla_cpu" backward pass recomputes `act(x)` and `act'(x)` from `x` in one elementwise pass
rather than keeping autodiff's intermediates (`erf`, `exp`, `sigmoid`, products) in the layer stack.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


from retnet_jax.config import ACTIVATIONS  # gelu: exact (erf), torch's default; swish = silu


def value_and_slope(name: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`act(x)` and `act'(x)`."""
    if name == "gelu":
        # erf, as torch computes it: XLA:CPU runs its erf 2x faster than the erfc jax.nn.gelu uses
        # (which is only more accurate where gelu is within 1e-7 of 0).
        cdf = 0.5 + 0.5 * jax.lax.erf(x * (1.0 / math.sqrt(2.0)))
        pdf = jnp.exp(-0.5 * jnp.square(x)) * (1.0 / math.sqrt(2.0 * math.pi))
        return x * cdf, cdf + x * pdf
    if name == "swish":
        sig = jax.nn.sigmoid(x)
        return x * sig, sig * (1.0 + x * (1.0 - sig))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def gate_cotangents(x, gate, value, slope, dy) -> tuple[jax.Array, jax.Array]:
    """`(dx, dgate)` of `act(x) * gate` for the cotangent `dy`, given `act(x)` and `act'(x)` in the
    accumulation dtype; `gate` may be the scalar stand-in for "no gate" (its cotangent is then summed)."""
    dy = dy.astype(value.dtype)
    dx = (dy * gate.astype(value.dtype) * slope).astype(x.dtype)
    dgate = dy * value
    if gate.shape != dy.shape:
        dgate = jnp.sum(dgate).reshape(gate.shape)
    return dx, dgate.astype(gate.dtype)

