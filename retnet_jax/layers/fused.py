"""Dense projections with hand-written backward passes: fewer, faster matmuls on XLA:CPU.

Two measured XLA:CPU effects drive this file (AMD EPYC, jax 0.10.2, float32, [2048, 512] inputs):

* A weight gradient `x^T dy` contracts over the long row axis. XLA runs that "transposed-LHS" dot at
  ~70% of a plain matmul's rate (107 vs 155 GFLOP/s); transposing `x` first (a copy the size of the
  activations) and multiplying plainly runs at the full rate. The `optimization_barrier` keeps XLA
  from folding the transpose back into the dot. Elsewhere (GPU, TPU) the matmul units take either
  layout, so the plain contraction is used.
* Differentiating the slices of a fused `[N, d] @ [d, S*E]` product builds one zero-padded array per
  output, which XLA then materialised twice (~6% of a training step); the backward here concatenates
  the cotangents once instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weight_gradient(x_nd: jax.Array, dy_nf: jax.Array) -> jax.Array:
    """`x^T dy` as `[d, f]`, at the plain-matmul rate on CPU (see the module docstring)."""
    if jax.default_backend() == "cpu":
        return jax.lax.optimization_barrier(x_nd.T) @ dy_nf
    return jnp.einsum("nd,nf->df", x_nd, dy_nf)


@jax.custom_vjp
def _fused_matmul(x_nd: jax.Array, kernel_dse: jax.Array) -> tuple[jax.Array, ...]:
    """`(x @ kernel[:, 0, :], ..., x @ kernel[:, S-1, :])`, as one `[N, d] @ [d, S*E]` matmul."""
    y_nse = jnp.einsum("nd,dse->nse", x_nd, kernel_dse)
    return tuple(y_nse[:, i] for i in range(y_nse.shape[1]))


def _fused_matmul_fwd(x_nd, kernel_dse):
    return _fused_matmul(x_nd, kernel_dse), (x_nd, kernel_dse)


def _fused_matmul_bwd(residuals, cotangents):
    x_nd, kernel_dse = residuals
    d, s, e = kernel_dse.shape
    dy_nf = cotangents[0] if s == 1 else jnp.concatenate(cotangents, axis=-1)  # [N, S*E], written once
    dx_nd = jnp.einsum("nf,df->nd", dy_nf, kernel_dse.reshape(d, s * e))
    return dx_nd, weight_gradient(x_nd, dy_nf).reshape(d, s, e)


_fused_matmul.defvjp(_fused_matmul_fwd, _fused_matmul_bwd)


def fused_projection(x_btd: jax.Array, kernel_dse: jax.Array, dtype) -> tuple[jax.Array, ...]:
    """`x @ kernel[:, s, :]` for every s (S arrays `[B, T, E]`) with a single matmul, in `dtype`."""
    batch, length, width = x_btd.shape
    outs_ne = _fused_matmul(x_btd.astype(dtype).reshape(batch * length, width), kernel_dse.astype(dtype))
    return tuple(y_ne.reshape(batch, length, -1) for y_ne in outs_ne)


def projection(x_bti: jax.Array, kernel_io: jax.Array, dtype) -> jax.Array:
    """`x @ kernel` (`[B, T, I] @ [I, O]`) in `dtype`, with the fast weight gradient."""
    (y_bto,) = fused_projection(x_bti, kernel_io[:, None, :], dtype)
    return y_bto


@jax.custom_vjp
def _unembed(x_nd: jax.Array, table_vd: jax.Array) -> jax.Array:
    return jnp.einsum("nd,vd->nv", x_nd, table_vd, preferred_element_type=jnp.float32)


def _unembed_fwd(x_nd, table_vd):
    return _unembed(x_nd, table_vd), (x_nd, table_vd)


def _unembed_bwd(residuals, dlogits_nv):
    x_nd, table_vd = residuals
    dlogits_nv = dlogits_nv.astype(x_nd.dtype)
    dx_nd = jnp.einsum("nv,vd->nd", dlogits_nv, table_vd, preferred_element_type=jnp.float32)
    # [d, V] at the plain-matmul rate, then one transpose of the (small) table gradient.
    dtable_dv = weight_gradient(x_nd, dlogits_nv)
    if jax.default_backend() == "cpu":
        dtable_dv = jax.lax.optimization_barrier(dtable_dv)
    return dx_nd.astype(x_nd.dtype), dtable_dv.T.astype(table_vd.dtype)


_unembed.defvjp(_unembed_fwd, _unembed_bwd)


def unembed(x_btd: jax.Array, table_vd: jax.Array, dtype) -> jax.Array:
    """Float32 logits `x @ table^T` (`[B, T, d]`, table `[V, d]`), the matmul in `dtype`."""
    batch, length, width = x_btd.shape
    logits_nv = _unembed(x_btd.astype(dtype).reshape(batch * length, width), table_vd.astype(dtype))
    return logits_nv.reshape(batch, length, -1)
