"""The gradient side of broadcasting: summing a cotangent back to the shape that was broadcast."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum `x` over the axes a broadcast to `x.shape` added or stretched from `shape`."""
    x = jnp.sum(x, axis=tuple(range(x.ndim - len(shape))))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=stretched, keepdims=True)
