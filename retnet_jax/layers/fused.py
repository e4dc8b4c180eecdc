"""Dense projections with hand-written backward passes: fewer, faster matmuls on XLA:CPU.

Measured XLA:CPU effects drive this file (2-core AMD EPYC and Xeon, jax 0.10.2, float32, [2048, 512]
inputs):

* A weight gradient `x^T dy` is left to XLA as the contraction it is. A transposed copy of `x` for a
  plain matmul ran ~30% faster on AMD EPYC, but on a Xeon both ran at the full rate, and made
  inside a scanned layer XLA fused the copy into the slicing (backward) or stacking (forward) of
  the residuals and ran it 8x slower than a plain transpose: 6.9 vs 0.8 ms for `[2048, 1024]`,
  about 8% of a training step. Contracting `x` as it is was 15% faster per step on the Xeon.
* Differentiating the slices of a fused `[N, d] @ [d, S*E]` product builds one zero-padded array per
  output, which XLA then materialised twice (~6% of a training step); the backward here concatenates
  the cotangents once instead.
* XLA:CPU runs independent operations concurrently, so a layer's `dx` and `dW` matmuls (or two
  projections of the same input) shared the two cores and their caches. One matmul for several
  projections, and `dW` ordered after `dx`, made a training step ~5% faster (paired runs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _pinned_on_cpu(x):
    """`x` (any pytree) behind an `optimization_barrier` on CPU, so XLA neither folds it into its
    consumers nor starts them before all of it is computed; unchanged on other backends."""
    return jax.lax.optimization_barrier(x) if jax.default_backend() == "cpu" else x


def weight_gradient(x_nd: jax.Array, dy_nf: jax.Array) -> jax.Array:
    """`x^T dy` as `[d, f]`, computed on CPU with the narrower of d, f as the rows of the product.

    XLA:CPU ran these long-contraction products at ~135 GFLOP/s per core when the output had more
    rows than columns and at ~160 otherwise (Xeon; `[1024, 512]` from 2048 tokens: 132 vs 158
    counting the transpose of the result, which is small).
    """
    if jax.default_backend() == "cpu" and x_nd.shape[1] > dy_nf.shape[1]:
        return _pinned_on_cpu(jnp.einsum("nf,nd->fd", dy_nf, x_nd)).T
    return jnp.einsum("nd,nf->df", x_nd, dy_nf)


def sequential(first, *then):
    """`(first, *then)` unchanged, but whatever consumes `then` waits for `first` to be computed.

    XLA:CPU runs independent operations concurrently; two matmuls sharing two cores then split
    the caches between them. Ordering them keeps each matmul's working set in cache.
    """
    return _pinned_on_cpu((first, *then))


def _kernel_matrix(kernels: tuple[jax.Array, ...], dtype) -> jax.Array:
    """The kernels `[d, S, E]` (or `[d, E]`) side by side as one `[d, sum S*E]` matrix in `dtype`."""
    width = kernels[0].shape[0]
    return jnp.concatenate([k.reshape(width, -1).astype(dtype) for k in kernels], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _split_matmul(x_nd: jax.Array, kernels: tuple[jax.Array, ...], widths: tuple[int, ...], dtype
                  ) -> tuple[jax.Array, ...]:
    """`x @ concat(kernels)` (one `[N, d] @ [d, F]` matmul) cut along F into pieces of `widths`."""
    y_nf = x_nd @ _kernel_matrix(kernels, dtype)
    return tuple(jnp.split(y_nf, np.cumsum(widths)[:-1], axis=-1)) if len(widths) > 1 else (y_nf,)


def _split_matmul_fwd(x_nd, kernels, widths, dtype):
    # The kernels are kept as given, not as the concatenated matrix: inside a scanned layer stack
    # they are slices of the stacked parameters, which the scan hands to the backward pass as they
    # are; a concatenated or reshaped copy would be written into a stacked [layers, ...] buffer.
    return _split_matmul(x_nd, kernels, widths, dtype), (x_nd, kernels)


def _split_matmul_bwd(widths, dtype, residuals, cotangents):
    x_nd, kernels = residuals
    dy_nf = cotangents[0] if len(widths) == 1 else jnp.concatenate(cotangents, axis=-1)  # written once
    dx_nd = jnp.einsum("nf,df->nd", dy_nf, _kernel_matrix(kernels, dtype))
    dx_nd, x_nd = sequential(dx_nd, x_nd)
    dkernel_df = weight_gradient(x_nd, dy_nf)
    sizes = [k.size // k.shape[0] for k in kernels]
    pieces = jnp.split(dkernel_df, np.cumsum(sizes)[:-1], axis=-1) if len(kernels) > 1 else [dkernel_df]
    return dx_nd, tuple(p.reshape(k.shape).astype(k.dtype) for p, k in zip(pieces, kernels))


_split_matmul.defvjp(_split_matmul_fwd, _split_matmul_bwd)


def fused_projection(x_btd: jax.Array, *kernels: jax.Array, dtype) -> tuple[jax.Array, ...]:
    """`x @ kernel[:, s, :]` for every kernel `[d, S, E]` (or `[d, E]`) and every s, as one matmul.

    Returns the S outputs `[B, T, E]` of each kernel in order, computed in `dtype`; the kernels are
    concatenated along their output axis first (a copy of the weights, cheap beside the matmul).
    """
    batch, length, width = x_btd.shape
    widths = tuple(k.shape[-1] for k in kernels for _ in range(k.size // (width * k.shape[-1])))
    outs_ne = _split_matmul(x_btd.astype(dtype).reshape(batch * length, width), tuple(kernels), widths,
                            jnp.dtype(dtype))
    return tuple(y_ne.reshape(batch, length, -1) for y_ne in outs_ne)


def projection(x_bti: jax.Array, kernel_io: jax.Array, dtype) -> jax.Array:
    """`x @ kernel` (`[B, T, I] @ [I, O]`) in `dtype`, with the fast weight gradient."""
    (y_bto,) = fused_projection(x_bti, kernel_io, dtype=dtype)
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
    # [d, V], then one transpose of the (small) table gradient: XLA:CPU ran the [V, d] product
    # directly as a slower transposed-output dot.
    dtable_dv = _pinned_on_cpu(weight_gradient(x_nd, dlogits_nv))
    return dx_nd.astype(x_nd.dtype), dtable_dv.T.astype(table_vd.dtype)


_unembed.defvjp(_unembed_fwd, _unembed_bwd)


def unembed(x_btd: jax.Array, table_vd: jax.Array, dtype) -> jax.Array:
    """Float32 logits `x @ table^T` (`[B, T, d]`, table `[V, d]`), the matmul in `dtype`."""
    batch, length, width = x_btd.shape
    logits_nv = _unembed(x_btd.astype(dtype).reshape(batch * length, width), table_vd.astype(dtype))
    return logits_nv.reshape(batch, length, -1)
