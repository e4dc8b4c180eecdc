"""`(act(x) * gate) @ W`: the GLU feed-forward's `fc2(act(x fc1) * (x gate))` and the retention
output `(swish(X Wg) * HeadNorm(Y)) Wo`.

With `kernels="xla_cpu"` the backward pass keeps `x`, `gate` and `W` and recomputes the product
`h = act(x) * gate` (and the activation's derivative) in one elementwise pass, instead of storing
`h` and the activation's intermediates in the scanned layer stack (experiments/PERFORMANCE.md).
Same function and gradients as autodiff of the formula, which `kernels="plain"` uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from retnet_jax.layers.activations import ACTIVATIONS, gate_cotangents, value_and_slope
from retnet_jax.layers.fused import projection, sequential, weight_gradient
from retnet_jax.ops.kernels import check_kernels
from retnet_jax.ops.state import accumulation_dtype


def gated_projection(name: str, x: jax.Array, gate: jax.Array | None, kernel: jax.Array, dtype, *,
                     kernels: str) -> jax.Array:
    """`(act(x) * gate) @ kernel`: x and gate `[B, T, I...]` (the same shape), kernel `[I..., O]`,
    result `[B, T, O]`. `gate=None` means `act(x) @ kernel`.

    The activation is computed in float32 at least and rounded to `x`'s dtype, the matmul runs in
    `dtype`, exactly as `projection(act(x) * gate, kernel)`.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have the shape of x {x.shape}, got {gate.shape}")
    n_in = x.ndim - 2
    if x.ndim < 3 or kernel.ndim != n_in + 1 or kernel.shape[:n_in] != x.shape[2:]:
        raise ValueError(f"x must be [B, T, I...] and kernel [I..., O] with the same I...; got x "
                         f"{x.shape}, kernel {kernel.shape}")
    gate = jnp.ones((), x.dtype) if gate is None else gate
    if check_kernels(kernels) == "plain":
        h = _hidden(name, x, gate)[0].reshape(x.shape)
        return projection(h, kernel, dtype=dtype, kernels="plain")
    # The kernel's input axes flattened: a reshape that keeps a sharded leading (heads) axis whole.
    return _gated_projection(name, jnp.dtype(dtype), x, gate, kernel.reshape(-1, kernel.shape[-1]))


def _hidden(name: str, x, gate):
    """`act(x) * gate` as `[N, I]` in `x`'s dtype, plus `act` and `act'` (float32 at least)."""
    acc = jnp.promote_types(accumulation_dtype(x.dtype), gate.dtype)
    value, slope = value_and_slope(name, x.astype(acc))
    h = (value * gate.astype(acc)).astype(x.dtype)
    return h.reshape(x.shape[0] * x.shape[1], -1), value, slope


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated_projection(name, dtype, x, gate, kernel_io):
    h_ni, _, _ = _hidden(name, x, gate)
    y_no = h_ni.astype(dtype) @ kernel_io.astype(dtype)
    return y_no.reshape(*x.shape[:2], -1)


def _gated_projection_fwd(name, dtype, x, gate, kernel_io):
    return _gated_projection(name, dtype, x, gate, kernel_io), (x, gate, kernel_io)


def _gated_projection_bwd(name, dtype, residuals, dy_bto):
    x, gate, kernel_io = residuals
    # The elementwise pass is left free to run beside the dh matmul (pinning it was slower).
    h_ni, value, slope = _hidden(name, x, gate)
    dy_no = dy_bto.reshape(h_ni.shape[0], -1).astype(dtype)
    dh_ni = jnp.einsum("no,io->ni", dy_no, kernel_io.astype(dtype))
    dh_ni, h_ni = sequential(dh_ni, h_ni)  # dW after dh: the two matmuls do not share the cores
    dkernel_io = weight_gradient(h_ni.astype(dtype), dy_no).astype(kernel_io.dtype)
    dh = dh_ni.astype(x.dtype).reshape(x.shape)  # in x's dtype, as projection hands it back
    return (*gate_cotangents(x, gate, value, slope, dh), dkernel_io)


_gated_projection.defvjp(_gated_projection_fwd, _gated_projection_bwd)
