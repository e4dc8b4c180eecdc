"""`gated_projection(name, x, gate, W)` = `(act(x) * gate) @ W`, whose backward pass recomputes the
product instead of storing it, is the same function as the composition it replaces and as autodiff
of the textbook formula.

Oracles:
- the composition `projection(activation(name, x, gate), W, dtype)`: the same operations, so the
  values are bit-equal; the gradients agree to 1e-6 in float32 (measured: bit-equal but for the weight
  gradient, ~6e-8, which XLA fuses differently) and to one bf16 ulp (2**-8) in bf16 (measured: equal);
- autodiff of `(jax.nn.gelu(x, approximate=False) or jax.nn.swish(x)) * gate @ W` in float64
  (tolerance 1e-12: both sides are float64 rounding apart).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close, precision
from jax.ad_checkpoint import print_saved_residuals

from retnet_jax.layers.activations import activation
from retnet_jax.layers.fused import projection
from retnet_jax.layers.gated_projection import gated_projection

PLAIN = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "swish": jax.nn.swish}


def _inputs(dtype, shape=(2, 7, 4, 16), outputs=24):
    """x and gate `[B, T, H, dv]` (the retention layout; the FFN's is `[B, T, F]`), W `[H*dv, O]`."""
    rng = np.random.default_rng(3)
    x, gate = (jnp.asarray(rng.standard_normal(shape) * 2, dtype) for _ in range(2))
    kernel = jnp.asarray(rng.standard_normal((int(np.prod(shape[2:])), outputs)) * 0.2, dtype)
    dy = jnp.asarray(rng.standard_normal((*shape[:2], outputs)), dtype)
    return x, gate, kernel, dy


def _loss(fn, dy):
    return lambda x, gate, kernel: jnp.sum(fn(x, gate, kernel).astype(jnp.float32) * dy.astype(jnp.float32))


@pytest.mark.parametrize("name", ["gelu", "swish"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("dtype, gate_dtype, tol", [
    (jnp.float32, jnp.float32, 1e-6),
    (jnp.bfloat16, jnp.bfloat16, 2**-8),
    (jnp.bfloat16, jnp.float32, 2**-8),  # retention in a bf16 model: bf16 x, float32 normalised heads
], ids=["float32", "bfloat16", "bf16-x-float32-gate"])
def test_equals_the_composition_of_activation_and_projection(name, gated, dtype, gate_dtype, tol):
    """Values and all three gradients equal those of `projection(activation(...))`."""
    x, gate, kernel, dy = _inputs(dtype)
    gate = gate.astype(gate_dtype) if gated else None
    kernel = kernel.astype(jnp.float32) if gate_dtype == jnp.float32 else kernel  # float32 parameters

    def ours(x, gate, kernel):
        return gated_projection(name, x, gate, kernel, dtype)

    def composed(x, gate, kernel):
        hidden = activation(name, x, gate)
        return projection(hidden.reshape(*x.shape[:2], -1), kernel, dtype)

    got, expected = jax.jit(ours)(x, gate, kernel), jax.jit(composed)(x, gate, kernel)
    assert got.dtype == expected.dtype == dtype and got.shape == (2, 7, 24)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    argnums = (0, 1, 2) if gated else (0, 2)
    grads = jax.jit(jax.grad(_loss(ours, dy), argnums))(x, gate, kernel)
    expected_grads = jax.jit(jax.grad(_loss(composed, dy), argnums))(x, gate, kernel)
    for g, e, primal in zip(grads, expected_grads, [p for p in (x, gate, kernel) if p is not None]):
        assert g.dtype == e.dtype == primal.dtype
        assert_relative_close(g.astype(jnp.float32), e.astype(jnp.float32), tol)


@pytest.mark.parametrize("name", ["gelu", "swish"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_gradients_equal_autodiff_of_the_formula_in_float64(name, gated):
    with precision(np.float64):
        x, gate, kernel, dy = _inputs(np.float64)
        gate = gate if gated else None

        def ours(x, gate, kernel):
            return gated_projection(name, x, gate, kernel, jnp.float64)

        def formula(x, gate, kernel):
            return (PLAIN[name](x) * (1.0 if gate is None else gate)).reshape(*x.shape[:2], -1) @ kernel

        argnums = (0, 1, 2) if gated else (0, 2)
        assert_relative_close(ours(x, gate, kernel), formula(x, gate, kernel), 1e-12)
        for g, e in zip(jax.grad(_loss(ours, dy), argnums)(x, gate, kernel),
                        jax.grad(_loss(formula, dy), argnums)(x, gate, kernel)):
            assert_relative_close(g, e, 1e-12)


def test_backward_pass_keeps_the_inputs_not_their_product(capsys):
    """The residuals are x, gate and the kernel (JAX's own listing of what a backward pass saves):
    no `[N, I]` array of the gated product is kept."""
    x, gate, kernel, _ = _inputs(jnp.float32)
    print_saved_residuals(
        lambda x, gate, kernel: jnp.sum(gated_projection("swish", x, gate, kernel, jnp.float32)), x, gate, kernel)
    listing = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[0] for line in listing) == ["f32[2,7,4,16]", "f32[2,7,4,16]", "f32[64,24]"], listing


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="relu"), "activation must be one of"),
    (dict(gate=jnp.ones((2, 7, 4, 8))), "gate must have the shape of x"),
    (dict(kernel=jnp.ones((63, 24))), "kernel_io"),
    (dict(x=jnp.ones((7, 64)), gate=None), "x must be"),
])
def test_bad_arguments_are_named(kwargs, message):
    x, gate, kernel, _ = _inputs(jnp.float32)
    args = dict(name="gelu", x=x, gate=gate, kernel=kernel) | kwargs
    with pytest.raises(ValueError, match=message):
        gated_projection(args["name"], args["x"], args["gate"], args["kernel"], jnp.float32)
