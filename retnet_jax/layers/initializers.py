"""Weight initialisers of torchscale 0.3.0, for kernels stored as `[fan_in, ..., fan_out]`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def xavier_uniform(key, fan_in: int, fan_out: int, shape, gain: float, dtype) -> jax.Array:
    """`U(-a, a)` with `a = gain * sqrt(6 / (fan_in + fan_out))` (torch.nn.init.xavier_uniform_)."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def torch_linear_default(key, fan_in: int, shape, dtype) -> jax.Array:
    """torch.nn.Linear's default: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def stacked(key, count: int, init_one) -> jax.Array:
    """`count` independent draws of `init_one(key)` stacked on axis 1 (fused projections)."""
    return jnp.stack([init_one(k) for k in jax.random.split(key, count)], axis=1)
