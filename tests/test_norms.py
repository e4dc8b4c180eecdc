"""The norms compute the textbook formulas, and under `kernels="xla_cpu"` their hand-written backward
passes (reductions as contractions, for XLA:CPU's sake) give the gradients of `kernels="plain"`.

Oracles: the plain formulas (`x / sqrt(mean(x**2) + eps)`, the centred variant, `y * scale + bias`)
for values and the module's gradients; the plain kernels' autodiff for the hand-written backward
passes. float64: both sides agree to ~1e-15; tolerance 1e-12 leaves room for the different summation
order. float32: 1e-5 (measured ~1e-7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close, precision
from flax import nnx

from retnet_jax.layers.norms import HeadNorm, Norm, normalise, scale_shift
from retnet_jax.ops.kernels import RESOLVED_KERNELS


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
def test_xla_cpu_gradients_equal_plain_autodiff(dtype, tol, centre):
    with precision(dtype):
        x, dy, w, b = _inputs(dtype)

        def loss(kernels):
            return lambda x, w, b: jnp.sum(
                scale_shift(normalise(x, centre, 1e-6, kernels=kernels), w, b, kernels=kernels) * dy)

        ours, plain = loss("xla_cpu"), loss("plain")
        assert_relative_close(ours(x, w, b), plain(x, w, b), tol)
        for got, expected in zip(jax.grad(ours, (0, 1, 2))(x, w, b), jax.grad(plain, (0, 1, 2))(x, w, b)):
            assert got.dtype == expected.dtype == dtype
            assert_relative_close(got, expected, tol)


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
def test_scale_gradient_keeps_the_parameter_dtype(kernels):
    """`scale_shift` without a bias, with a bf16 parameter: its gradient is bf16 (the parameter's
    dtype) and equals autodiff of `x * scale` in float32 to bf16 rounding (2**-8 < 1e-2)."""
    x, dy, w, _ = _inputs(np.float32, (4, 5, 8))
    w = w[0].astype(jnp.bfloat16)
    got = jax.grad(lambda x, w: jnp.sum(scale_shift(x, w, kernels=kernels) * dy), (0, 1))(x, w)
    expected = jax.grad(lambda x, w: jnp.sum(x * w.astype(jnp.float32) * dy), (0, 1))(x, w)
    assert got[1].dtype == jnp.bfloat16
    assert_relative_close(got[0], expected[0], 1e-6)
    assert_relative_close(got[1].astype(jnp.float32), expected[1].astype(jnp.float32), 1e-2)


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_module_gradients_match_the_formula(kind, kernels):
    """`Norm` under `nnx.grad` (the model's code path): input and scale gradients of the formula."""
    norm = Norm(16, kind, 1e-6, dtype=jnp.float32, param_dtype=jnp.float32, kernels=kernels)
    x, dy, _, _ = _inputs(np.float32, (3, 5, 16))

    def loss(norm, x):
        return jnp.sum(norm(x) * dy)

    grads = nnx.grad(loss, argnums=(0, 1))(norm, x)
    expected_dx = jax.grad(lambda x: jnp.sum(plain_normalise(x, kind == "layernorm", 1e-6) * dy))(x)
    assert_relative_close(grads[1], expected_dx, 1e-5)
    expected_dscale = jnp.sum(plain_normalise(x, kind == "layernorm", 1e-6) * dy, axis=(0, 1))
    assert_relative_close(grads[0].scale[...], expected_dscale, 1e-5)


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm", "groupnorm"])
def test_head_norm_normalises_each_head_separately(kind, kernels):
    heads, dv = 3, 8
    head_norm = HeadNorm(heads, dv, kind, 1e-6, param_dtype=jnp.float32, kernels=kernels)
    x, _, _, _ = _inputs(np.float32, (2, 5, heads, dv))
    got = head_norm(x)
    expected = plain_normalise(x, kind != "rmsnorm", 1e-6)
    assert_relative_close(got, expected, 1e-6)
