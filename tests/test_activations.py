"""`activation(name, x, gate)` (a backward pass that recomputes the activation instead of storing
its intermediates) is the same function as autodiff of the textbook formulas.

Oracle: `jax.nn.gelu(x, approximate=False) * gate` and `jax.nn.swish(x) * gate` and their `jax.grad`,
in float64, where both sides agree to ~1e-16 (ours evaluates gelu with erf, jax with erfc; both are
accurate to float64 rounding); tolerance 1e-12. In float32 the same holds to 1e-6 (measured ~2e-7:
erf and erfc round differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close, precision

from retnet_jax.layers.activations import activation

PLAIN = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "swish": jax.nn.swish}


def _inputs(dtype, shape=(3, 5, 64)):
    rng = np.random.default_rng(0)
    x, gate, dy = (jnp.asarray(rng.standard_normal(shape) * 3, dtype) for _ in range(3))
    return x, gate, dy


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["gelu", "swish"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_activation_and_its_gradients_equal_autodiff_of_the_formula(dtype, tol, name, gated):
    with precision(dtype):
        x, gate, dy = _inputs(dtype)
        if not gated:
            gate = None

        def ours(x, gate):
            return jnp.sum(activation(name, x, gate) * dy)

        def plain(x, gate):
            return jnp.sum(PLAIN[name](x) * (1.0 if gate is None else gate) * dy)

        assert activation(name, x, gate).dtype == dtype
        assert_relative_close(activation(name, x, gate), PLAIN[name](x) * (1.0 if gate is None else gate), tol)
        argnums = (0, 1) if gated else (0,)
        for got, expected in zip(jax.grad(ours, argnums)(x, gate), jax.grad(plain, argnums)(x, gate)):
            assert got.dtype == expected.dtype == dtype
            assert_relative_close(got, expected, tol)


def test_bf16_input_is_computed_in_float32_and_returned_in_bf16():
    """The gate of retention is bf16 in a bf16 model and the heads float32: the product is taken in
    float32 (no double rounding), returned in the dtype of `x`."""
    x, gate, _ = _inputs(np.float32)
    got = activation("swish", x.astype(jnp.bfloat16), gate)
    expected = jax.nn.swish(x.astype(jnp.bfloat16).astype(jnp.float32)) * gate
    assert got.dtype == jnp.bfloat16
    assert_relative_close(got.astype(jnp.float32), expected.astype(jnp.bfloat16).astype(jnp.float32), 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(name="relu"), "activation must be one of"), (dict(gate=jnp.ones((2, 3))), "gate must have the shape")],
)
def test_bad_arguments_name_themselves(kwargs, message):
    args = dict(name="gelu", x=jnp.ones((3, 2)), gate=None) | kwargs
    with pytest.raises(ValueError, match=message):
        activation(args["name"], args["x"], args["gate"])
