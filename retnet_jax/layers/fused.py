"""Dense projections: `x @ kernel` with multi-axis kernels, fused pieces and float32 logits.

Kernels keep their logical axes (`[d, H, 2dk + 2dv]`, `[H, dv, d]`, `[d, 2, ffn]`) and are contracted
as they are, never reshaped or concatenated per call: under tensor parallelism each device then
multiplies by its own heads or hidden units, and a decode step reads each weight once.

With `kernels="xla_cpu"` the backward passes are written by hand for XLA:CPU (measured in
experiments/PERFORMANCE.md): the cotangents of fused pieces are concatenated once (autodiff of the
slices builds and adds zero-padded arrays), `dx` is ordered before `dW` (two matmuls sharing two
cores split the caches), and `dW` is computed with the narrower side as the rows of the product.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.ops.kernels import check_kernels


def pinned(x):
    """`x` (any pytree) behind an `optimization_barrier`: XLA neither folds it into its consumers
    nor starts them before all of it is computed."""
    return jax.lax.optimization_barrier(x)


def sequential(first, *then):
    """`(first, *then)` unchanged, but whatever consumes `then` waits for `first` to be computed
    (XLA:CPU runs independent matmuls concurrently, splitting the two cores' caches)."""
    return pinned((first, *then))


def weight_gradient(x_ni: jax.Array, dy_no: jax.Array) -> jax.Array:
    """`x^T dy` as `[I..., O...]` from `x [N, I...]`, `dy [N, O...]`: with the narrower of I, O as
    the rows of the product, which XLA:CPU runs ~15% faster for these long contractions."""
    n_in, n_out = x_ni.ndim - 1, dy_no.ndim - 1
    if math.prod(x_ni.shape[1:]) > math.prod(dy_no.shape[1:]):
        dw_oi = pinned(_contract_tokens(dy_no, x_ni))
        return jnp.transpose(dw_oi, tuple(range(n_out, n_out + n_in)) + tuple(range(n_out)))
    return _contract_tokens(x_ni, dy_no)


def _contract_tokens(a, b):
    """`sum_n a[n, ...] b[n, ...]` -> `[a..., b...]`."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def _contract(x_ni: jax.Array, kernel: jax.Array, preferred_element_type=None) -> jax.Array:
    """`[N, I...] @ [I..., O...] -> [N, O...]`, contracting all of x's trailing axes."""
    n_in = x_ni.ndim - 1
    return jax.lax.dot_general(x_ni, kernel, ((tuple(range(1, n_in + 1)), tuple(range(n_in))), ((), ())),
                               preferred_element_type=preferred_element_type)


def _check(x, kernel, name="kernel"):
    n_in = x.ndim - 2
    if x.ndim < 3 or kernel.ndim <= n_in or kernel.shape[:n_in] != x.shape[2:]:
        raise ValueError(f"x must be [B, T, I...] and {name} [I..., O...] with the same I...; got x "
                         f"{x.shape}, {name} {kernel.shape}")


def projection(x: jax.Array, kernel: jax.Array, *, dtype, kernels: str) -> jax.Array:
    """`x [B, T, I...] @ kernel [I..., O...] -> [B, T, O...]` in `dtype`."""
    (y,) = fused_projection(x, kernel, (kernel.shape[-1],), dtype=dtype, kernels=kernels)
    return y


def fused_projection(x: jax.Array, kernel: jax.Array, sizes: tuple[int, ...], *, axis: int = -1,
                     dtype, kernels: str) -> tuple[jax.Array, ...]:
    """`x @ kernel` as one matmul, returned in pieces of `sizes` along output axis `axis`.

    x `[B, T, I...]`, kernel `[I..., O...]`; each piece is `[B, T, O...]` with `axis` cut to its
    size (e.g. q, k, v, g from a `[d, H, 2dk + 2dv]` kernel: sizes `(dk, dk, dv, dv)`).
    """
    _check(x, kernel)
    n_in = x.ndim - 2
    axis = axis % (kernel.ndim - n_in) - (kernel.ndim - n_in)  # negative: counted from the end
    sizes = tuple(int(s) for s in sizes)
    if sum(sizes) != kernel.shape[axis]:
        raise ValueError(f"sizes {sizes} must add up to the kernel's axis {axis}, {kernel.shape[axis]}")
    batch, length = x.shape[:2]
    x_ni = x.astype(dtype).reshape(batch * length, *x.shape[2:])
    kernel = kernel.astype(dtype)
    if check_kernels(kernels) == "plain":
        pieces = _split(_contract(x_ni, kernel), sizes, axis)
    else:
        pieces = _split_matmul(x_ni, kernel, sizes, axis)
    return tuple(p.reshape(batch, length, *p.shape[1:]) for p in pieces)


def _split(y, sizes, axis):
    return tuple(jnp.split(y, np.cumsum(sizes)[:-1], axis=axis)) if len(sizes) > 1 else (y,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _split_matmul(x_ni, kernel, sizes, axis):
    return _split(_contract(x_ni, kernel), sizes, axis)


def _split_matmul_fwd(x_ni, kernel, sizes, axis):
    return _split_matmul(x_ni, kernel, sizes, axis), (x_ni, kernel)


def _split_matmul_bwd(sizes, axis, residuals, cotangents):
    x_ni, kernel = residuals
    dy_no = cotangents[0] if len(sizes) == 1 else jnp.concatenate(cotangents, axis=axis)  # written once
    n_in, n_out = x_ni.ndim - 1, dy_no.ndim - 1
    out_axes = tuple(range(1, n_out + 1))
    dx_ni = jax.lax.dot_general(dy_no, kernel, ((out_axes, tuple(range(n_in, n_in + n_out))), ((), ())))
    dx_ni, x_ni = sequential(dx_ni, x_ni)
    return dx_ni, weight_gradient(x_ni, dy_no).astype(kernel.dtype)


_split_matmul.defvjp(_split_matmul_fwd, _split_matmul_bwd)


def _logit_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)  # float32 logits (float64 under float64)


@jax.custom_vjp
def _unembed(x_nd: jax.Array, table_vd: jax.Array) -> jax.Array:
    return jnp.einsum("nd,vd->nv", x_nd, table_vd, preferred_element_type=_logit_dtype(x_nd.dtype))


def _unembed_fwd(x_nd, table_vd):
    return _unembed(x_nd, table_vd), (x_nd, table_vd)


def _unembed_bwd(residuals, dlogits_nv):
    x_nd, table_vd = residuals
    dlogits_nv = dlogits_nv.astype(x_nd.dtype)
    dx_nd = jnp.einsum("nv,vd->nd", dlogits_nv, table_vd, preferred_element_type=_logit_dtype(x_nd.dtype))
    # [d, V], then one transpose of the (small) table gradient: XLA:CPU ran the [V, d] product
    # directly as a slower transposed-output dot.
    dtable_dv = pinned(weight_gradient(x_nd, dlogits_nv))
    return dx_nd.astype(x_nd.dtype), dtable_dv.T.astype(table_vd.dtype)


_unembed.defvjp(_unembed_fwd, _unembed_bwd)


def unembed(x_btd: jax.Array, table_vd: jax.Array, dtype, *, kernels: str) -> jax.Array:
    """Float32 logits `x @ table^T` (`[B, T, d]`, table `[V, d]`), the matmul in `dtype`."""
    x_btd, table_vd = x_btd.astype(dtype), table_vd.astype(dtype)
    if check_kernels(kernels) == "plain":
        return jnp.einsum("btd,vd->btv", x_btd, table_vd, preferred_element_type=_logit_dtype(dtype))
    batch, length, width = x_btd.shape
    return _unembed(x_btd.reshape(batch * length, width), table_vd).reshape(batch, length, -1)
