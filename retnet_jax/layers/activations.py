"""`act(x) * gate` with a backward pass that keeps only `x` and `gate`.

Autodiff of `gelu(x) * gate` keeps four `[B, T, ffn]` intermediates of the activation (`erfc`,
`exp`, products) for the backward pass, and of `swish(g) * o` three (`sigmoid` and products). In a
scanned layer stack each one is written into a stacked `[layers, ...]` buffer in the forward pass
(zero-filled first) and read back in the backward pass. Here the backward pass recomputes the
activation and its derivative from `x` (one elementwise pass), and the residuals are just the two
inputs, which the projections' own backward passes keep anyway. Same function, same gradients
(tested against autodiff in float64). Computed in float32 at least, returned in `x`'s dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from retnet_jax.ops.state import accumulation_dtype

ACTIVATIONS = ("gelu", "swish")  # gelu: exact (erf), torch's default; swish = silu


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


def activation(name: str, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
    """`act(x) * gate` (or `act(x)` when `gate` is None), `act` being "gelu" (exact) or "swish"."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have the shape of x {x.shape}, got {gate.shape}")
    return _gated(name, x, jnp.ones((), x.dtype) if gate is None else gate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated(name: str, x: jax.Array, gate: jax.Array) -> jax.Array:
    acc = jnp.promote_types(accumulation_dtype(x.dtype), gate.dtype)
    value = value_and_slope(name, x.astype(acc))[0]
    return (value * gate.astype(acc)).astype(x.dtype)


def _gated_fwd(name, x, gate):
    return _gated(name, x, gate), (x, gate)


def _gated_bwd(name, residuals, dy):
    x, gate = residuals
    acc = jnp.promote_types(accumulation_dtype(x.dtype), gate.dtype)
    return gate_cotangents(x, gate, *value_and_slope(name, x.astype(acc)), dy)


def gate_cotangents(x, gate, value, slope, dy) -> tuple[jax.Array, jax.Array]:
    """`(dx, dgate)` of `act(x) * gate` for the cotangent `dy`, given `act(x)` and `act'(x)` in the
    accumulation dtype; `gate` may be the scalar stand-in for "no gate" (its cotangent is then summed)."""
    dy = dy.astype(value.dtype)
    dx = (dy * gate.astype(value.dtype) * slope).astype(x.dtype)
    dgate = dy * value
    if gate.shape != dy.shape:
        dgate = jnp.sum(dgate).reshape(gate.shape)
    return dx, dgate.astype(gate.dtype)


_gated.defvjp(_gated_fwd, _gated_bwd)
