"""Fused projections: one matmul for several outputs, split without a costly backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def unstack_fused(y_btse: jax.Array) -> tuple[jax.Array, ...]:
    """Split a fused projection `[B, T, S, E]` into S arrays `[B, T, E]`.

    Plain slicing differentiates into one zero-padded `[B, T, S, E]` array per output plus their sum;
    this backward pass stacks the S cotangents once instead (measured: ~7% of a training step).
    """
    return tuple(y_btse[:, :, i] for i in range(y_btse.shape[2]))


def _unstack_fwd(y_btse):
    return unstack_fused(y_btse), None


def _unstack_bwd(_, cotangents):
    return (jnp.stack(cotangents, axis=2),)


unstack_fused.defvjp(_unstack_fwd, _unstack_bwd)


def fused_projection(x_btd: jax.Array, kernel_dse: jax.Array, dtype) -> tuple[jax.Array, ...]:
    """`x @ kernel[:, s, :]` for every s with a single `[d, S*E]` matmul, in `dtype`."""
    y_btse = jnp.einsum("btd,dse->btse", x_btd.astype(dtype), kernel_dse.astype(dtype))
    return unstack_fused(y_btse)
