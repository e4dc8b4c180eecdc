"""The norms' hand-written backward passes (reductions as contractions, for XLA:CPU's sake) are the
same function as autodiff of the textbook formulas.

Oracle: `jax.grad` of the plain formulas (`x / sqrt(mean(x**2) + eps)`, the centred variant, and
`y * scale + bias`), in float64, where both sides agree to ~1e-15; tolerance 1e-12 leaves room for
the different summation order. In float32 the same comparison holds to 1e-5 (measured ~1e-7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close, precision
from flax import nnx

from retnet_jax.layers.norms import HeadNorm, Norm, normalise, scale_shift


def plain_normalise(x, centre, eps):
    if centre:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _inputs(dtype, shape=(2, 7, 3, 16)):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 0.5, dtype)
    dy = jnp.asarray(rng.standard_normal(shape), dtype)
    w = jnp.asarray(rng.standard_normal(shape[-2:]) + 1, dtype)
    b = jnp.asarray(rng.standard_normal(shape[-2:]), dtype)
    return x, dy, w, b


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("centre", [False, True], ids=["rms", "layer"])
def test_normalise_gradient_equals_autodiff_of_the_formula(dtype, tol, centre):
    with precision(dtype):
        x, dy, w, b = _inputs(dtype)

        def ours(x, w, b):
            return jnp.sum(scale_shift(normalise(x, centre, 1e-6), w, b) * dy)

        def plain(x, w, b):
            return jnp.sum((plain_normalise(x, centre, 1e-6) * w + b) * dy)

        assert_relative_close(ours(x, w, b), plain(x, w, b), tol)
        for got, expected in zip(jax.grad(ours, (0, 1, 2))(x, w, b), jax.grad(plain, (0, 1, 2))(x, w, b)):
            assert got.dtype == expected.dtype == dtype
            assert_relative_close(got, expected, tol)


def test_scale_gradient_equals_autodiff_and_keeps_the_parameter_dtype():
    """`scale_shift` without a bias, with a bf16 parameter: gradients in bf16 (the parameter's dtype), values as autodiff."""
    x, dy, w, _ = _inputs(np.float32, (4, 5, 8))
    w = w[0].astype(jnp.bfloat16)
    got = jax.grad(lambda x, w: jnp.sum(scale_shift(x, w) * dy), (0, 1))(x, w)
    expected = jax.grad(lambda x, w: jnp.sum(x * w.astype(jnp.float32) * dy), (0, 1))(x, w)
    assert got[1].dtype == jnp.bfloat16
    assert_relative_close(got[0], expected[0], 1e-6)
    assert_relative_close(got[1].astype(jnp.float32), expected[1].astype(jnp.float32), 1e-2)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_module_gradients_match_the_formula(kind):
    """`Norm` under `nnx.grad` (model code path), bf16 activations in and out, float32 inside."""
    norm = Norm(16, kind, 1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
    x, dy, _, _ = _inputs(np.float32, (3, 5, 16))

    def loss(norm, x):
        return jnp.sum(norm(x) * dy)

    grads = nnx.grad(loss, argnums=(0, 1))(norm, x)
    expected_dx = jax.grad(lambda x: jnp.sum(plain_normalise(x, kind == "layernorm", 1e-6) * dy))(x)
    assert_relative_close(grads[1], expected_dx, 1e-5)
    expected_dscale = jnp.sum(plain_normalise(x, kind == "layernorm", 1e-6) * dy, axis=(0, 1))
    assert_relative_close(grads[0].scale[...], expected_dscale, 1e-5)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm", "groupnorm"])
def test_head_norm_normalises_each_head_separately(kind):
    heads, dv = 3, 8
    head_norm = HeadNorm(heads, dv, kind, 1e-6, param_dtype=jnp.float32)
    x, _, _, _ = _inputs(np.float32, (2, 5, heads, dv))
    got = head_norm(x)
    expected = plain_normalise(x, kind != "rmsnorm", 1e-6)
    assert_relative_close(got, expected, 1e-6)
