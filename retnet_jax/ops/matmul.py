"""Batched matmuls whose backward products come out in the layout their consumers read.

Autodiff of `einsum("...ij,...jk->...ik")` computes the gradient of the right operand as a dot with
the output `[..., k, j]` and then transposes it. XLA:CPU kept that transpose and fused it into the
strided loop that adds the gradient's two contributions and moves heads back beside the tokens:
in the chunkwise backward pass of a `[2048, 4 heads]` layer, one such fusion took 5.8 ms for an
8 MB result. Each backward product here is written with its result dimensions in the order a dot
produces them (batch, left free, right free), so no transpose follows it. In the benchmark's
6-layer training step (T=2048, 2-core Xeon, paired runs) that was ~2% of the step.

All three take operands with the same leading (batch) dimensions and accumulate in
`preferred_element_type` (None: the operands' type). Being `jax.custom_vjp` functions, they are
differentiable in reverse mode only (`jax.jvp` raises a TypeError).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _dot(a, b, contract_a: int, contract_b: int, out_dtype):
    """`dot_general` over the shared leading batch dimensions of `a` and `b` (both rank >= 2)."""
    batch = tuple(range(a.ndim - 2))
    return jax.lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), (batch, batch)), preferred_element_type=out_dtype)


def _grad_dot(a, b, contract_a: int, contract_b: int, out_dtype):
    """A backward product: operands in `out_dtype`, accumulated in at least float32, then cast."""
    acc = jnp.promote_types(out_dtype, jnp.float32)
    out = _dot(a.astype(out_dtype), b.astype(out_dtype), contract_a, contract_b, acc)
    return out.astype(out_dtype)


def _last(x):
    return x.ndim - 1


def _first(x):
    return x.ndim - 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_nn(a_ij: jax.Array, b_jk: jax.Array, preferred_element_type=None) -> jax.Array:
    return _dot(a_ij, b_jk, _last(a_ij), _first(b_jk), preferred_element_type)


def _nn_fwd(a_ij, b_jk, preferred_element_type):
    return _matmul_nn(a_ij, b_jk, preferred_element_type), (a_ij, b_jk)


def _nn_bwd(preferred_element_type, residuals, g_ik):
    a_ij, b_jk = residuals
    da_ij = _grad_dot(g_ik, b_jk, _last(g_ik), _last(b_jk), a_ij.dtype)  # [i,k] [j,k]
    db_jk = _grad_dot(a_ij, g_ik, _first(a_ij), _first(g_ik), b_jk.dtype)  # [i,j] [i,k]
    return da_ij, db_jk


_matmul_nn.defvjp(_nn_fwd, _nn_bwd)


def matmul_nn(a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
    """`[..., i, j] @ [..., j, k] -> [..., i, k]`. Operands are promoted to a common dtype first."""
    dtype = jnp.result_type(a, b)
    return _matmul_nn(a.astype(dtype), b.astype(dtype), preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_nt(a_ik: jax.Array, b_jk: jax.Array, preferred_element_type=None) -> jax.Array:
    return _dot(a_ik, b_jk, _last(a_ik), _last(b_jk), preferred_element_type)


def _nt_fwd(a_ik, b_jk, preferred_element_type):
    return _matmul_nt(a_ik, b_jk, preferred_element_type), (a_ik, b_jk)


def _nt_bwd(preferred_element_type, residuals, g_ij):
    a_ik, b_jk = residuals
    da_ik = _grad_dot(g_ij, b_jk, _last(g_ij), _first(b_jk), a_ik.dtype)  # [i,j] [j,k]
    db_jk = _grad_dot(g_ij, a_ik, _first(g_ij), _first(a_ik), b_jk.dtype)  # [i,j] [i,k]
    return da_ik, db_jk


_matmul_nt.defvjp(_nt_fwd, _nt_bwd)


def matmul_nt(a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
    """`[..., i, k] @ [..., j, k]^T -> [..., i, j]`. Operands are promoted to a common dtype first."""
    dtype = jnp.result_type(a, b)
    return _matmul_nt(a.astype(dtype), b.astype(dtype), preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_tn(a_ji: jax.Array, b_jk: jax.Array, preferred_element_type=None) -> jax.Array:
    return _dot(a_ji, b_jk, _first(a_ji), _first(b_jk), preferred_element_type)


def _tn_fwd(a_ji, b_jk, preferred_element_type):
    return _matmul_tn(a_ji, b_jk, preferred_element_type), (a_ji, b_jk)


def _tn_bwd(preferred_element_type, residuals, g_ik):
    a_ji, b_jk = residuals
    da_ji = _grad_dot(b_jk, g_ik, _last(b_jk), _last(g_ik), a_ji.dtype)  # [j,k] [i,k]
    db_jk = _grad_dot(a_ji, g_ik, _last(a_ji), _first(g_ik), b_jk.dtype)  # [j,i] [i,k]
    return da_ji, db_jk


_matmul_tn.defvjp(_tn_fwd, _tn_bwd)


def matmul_tn(a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
    """`[..., j, i]^T @ [..., j, k] -> [..., i, k]`. Operands are promoted to a common dtype first."""
    dtype = jnp.result_type(a, b)
    return _matmul_tn(a.astype(dtype), b.astype(dtype), preferred_element_type)
