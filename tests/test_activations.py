"""`value_and_slope(name, x)` gives an activation and its derivative, which `gated_projection`'s
"xla_cpu" backward pass uses instead of storing autodiff's intermediates.

Oracles, in float64 (both sides agree to ~1e-16; tolerance 1e-12):
- the value: `jax.nn.gelu(x, approximate=False)` and `jax.nn.swish(x)` (ours evaluates gelu with erf,
  jax with erfc; both are accurate to float64 rounding);
- the slope: `jax.grad` of our own value, elementwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close, precision

from retnet_jax.layers.activations import ACTIVATIONS, value_and_slope
from retnet_jax.layers.gated_projection import gated_projection
from retnet_jax.ops.kernels import RESOLVED_KERNELS

TEXTBOOK = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "swish": jax.nn.swish}


def _x(dtype, shape=(3, 5, 64)):
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape) * 3, dtype)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_value_is_the_textbook_activation_float64(name):
    with precision(np.float64):
        x = _x(np.float64)
        assert_relative_close(value_and_slope(name, x)[0], TEXTBOOK[name](x), 1e-12)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_slope_is_the_derivative_of_the_value_float64(name):
    with precision(np.float64):
        x = _x(np.float64)
        autodiff = jax.vmap(jax.grad(lambda x: value_and_slope(name, x)[0]))(x.ravel()).reshape(x.shape)
        assert_relative_close(value_and_slope(name, x)[1], autodiff, 1e-12)


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
def test_bf16_activation_times_float32_gate_is_rounded_once_to_bf16(kernels):
    """Retention's output gate in a bf16 model is bf16 and the normalised heads float32: the product
    `swish(x) * heads` is taken in float32 and rounded once to x's dtype (no double rounding), as
    `gated_projection` hands it to the matmul. Read through an identity kernel, the result is that
    bf16 product exactly."""
    x, gate = _x(jnp.bfloat16, (2, 5, 8)), _x(np.float32, (2, 5, 8)) / 3
    got = gated_projection("swish", x, gate, jnp.eye(8), jnp.float32, kernels=kernels)
    expected = (jax.nn.swish(x.astype(jnp.float32)) * gate).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected, np.float32))


def test_an_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'swish'\)"):
        value_and_slope("relu", jnp.ones(3))
