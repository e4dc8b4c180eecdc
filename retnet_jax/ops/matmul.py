"""Batched matmuls whose backward products come out in the layout their consumers read.

Autodiff of `einsum("...ij,...jk->...ik")` computes the gradient of the right operand as a dot with
the output `[..., k, j]` and then transposes it, a transpose XLA:CPU fused into a slow strided loop
(experiments/PERFORMANCE.md). With `kernels="xla_cpu"` each backward product is written with its
result dimensions in the order a dot produces them (batch, left free, right free); with
`kernels="plain"` these are plain dots.

All take operands with the same leading (batch) dimensions and accumulate in
`preferred_element_type` (None: the operands' type).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from retnet_jax.ops.broadcast import sum_to_shape
from retnet_jax.ops.kernels import check_kernels


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(a, b, a_contracts_last: bool, b_contracts_first: bool, preferred_element_type):
    """`[..., i, k]` from `a` (`[..., i, j]`, or `[..., j, i]`) and `b` (`[..., j, k]`, or `[..., k, j]`)."""
    return _dot(a, b, a.ndim - 2 + a_contracts_last, b.ndim - 1 - b_contracts_first,
                preferred_element_type)


def _matmul_fwd(a, b, a_contracts_last, b_contracts_first, preferred_element_type):
    return _matmul(a, b, a_contracts_last, b_contracts_first, preferred_element_type), (a, b)


def _matmul_bwd(a_contracts_last, b_contracts_first, preferred_element_type, residuals, g_ik):
    """Each gradient as a dot whose result order (batch, left free, right free) is its operand's."""
    a, b = residuals
    g_i, g_k = g_ik.ndim - 2, g_ik.ndim - 1
    b_k = b.ndim - 2 + b_contracts_first  # b's free (k) axis
    a_i = a.ndim - 1 - a_contracts_last  # a's free (i) axis
    if a_contracts_last:  # a [i, j] = g [i, k] . b over k
        da = _grad_dot(g_ik, b, g_k, b_k, a.dtype)
    else:  # a [j, i] = b . g [i, k] over k
        da = _grad_dot(b, g_ik, b_k, g_k, a.dtype)
    if b_contracts_first:  # b [j, k] = a . g [i, k] over i
        db = _grad_dot(a, g_ik, a_i, g_i, b.dtype)
    else:  # b [k, j] = g [i, k] . a over i
        db = _grad_dot(g_ik, a, g_i, a_i, b.dtype)
    return da, db


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _promoted(a, b):
    dtype = jnp.result_type(a, b)
    return a.astype(dtype), b.astype(dtype)


def _matmul_by(kernels: str, a, b, a_contracts_last: bool, b_contracts_first: bool,
               preferred_element_type):
    a, b = _promoted(a, b)
    if check_kernels(kernels) == "plain":
        return _dot(a, b, a.ndim - 2 + a_contracts_last, b.ndim - 1 - b_contracts_first,
                    preferred_element_type)
    return _matmul(a, b, a_contracts_last, b_contracts_first, preferred_element_type)


def matmul_nn(a: jax.Array, b: jax.Array, preferred_element_type=None, *, kernels: str) -> jax.Array:
    """`[..., i, j] @ [..., j, k] -> [..., i, k]`. Operands are promoted to a common dtype first."""
    return _matmul_by(kernels, a, b, True, True, preferred_element_type)


def matmul_nt(a: jax.Array, b: jax.Array, preferred_element_type=None, *, kernels: str) -> jax.Array:
    """`[..., i, k] @ [..., j, k]^T -> [..., i, j]`. Operands are promoted to a common dtype first."""
    return _matmul_by(kernels, a, b, True, False, preferred_element_type)


def weighted_matmul_tn(a: jax.Array, weight: jax.Array, b: jax.Array, preferred_element_type=None,
                       *, kernels: str) -> jax.Array:
    """`(weight[..., j, None] * a[..., j, i])^T @ b[..., j, k] -> [..., i, k]`: `matmul_tn` with the
    rows of `a` weighted, `weight` broadcasting against `a.shape[:-1]`.

    The backward pass keeps `a`, `weight` and `b`, not the weighted copy of `a` that
    `matmul_tn(a * weight[..., None], b)` would store. In the chunkwise form `a` is the keys of each
    chunk, which the in-chunk product keeps anyway, and `weight` their decay to the chunk's end: in the
    scanned layer stack the weighted copy was another `[B, H, N, C, dk]` array per layer.
    Operands are promoted to a common dtype first; the weight is applied in that dtype.
    """
    a, b = _promoted(a, b)
    if weight.ndim > a.ndim - 1 or any(
            w not in (1, n) for w, n in zip(weight.shape[::-1], a.shape[-2::-1])):
        raise ValueError(f"weight must broadcast against a's rows {a.shape[:-1]}, got {weight.shape}")
    if check_kernels(kernels) == "plain":
        return _dot(a * weight.astype(a.dtype)[..., None], b, a.ndim - 2, b.ndim - 2, preferred_element_type)
    return _weighted_matmul_tn(a, weight.astype(a.dtype), b, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _weighted_matmul_tn(a, weight, b, preferred_element_type):
    return _matmul(a * weight[..., None], b, False, True, preferred_element_type)


def _weighted_matmul_tn_fwd(a, weight, b, preferred_element_type):
    return _weighted_matmul_tn(a, weight, b, preferred_element_type), (a, weight, b)


def _weighted_matmul_tn_bwd(preferred_element_type, residuals, g_ik):
    a, weight, b = residuals
    w = weight[..., None]
    # d(a * w) [j, i] = b [j, k] . g [i, k] over k; db [j, k] = (a * w) [j, i] . g [i, k] over i, which
    # is w * (a . g): the weighted copy of `a` is never formed.
    d_aw = _grad_dot(b, g_ik, b.ndim - 1, g_ik.ndim - 1, a.dtype)
    db = (w * _grad_dot(a, g_ik, a.ndim - 1, g_ik.ndim - 2, b.dtype)).astype(b.dtype)
    da = (d_aw * w).astype(a.dtype)
    d_weight = sum_to_shape(jnp.sum(d_aw * a, axis=-1), weight.shape).astype(weight.dtype)
    return da, d_weight, db


_weighted_matmul_tn.defvjp(_weighted_matmul_tn_fwd, _weighted_matmul_tn_bwd)
