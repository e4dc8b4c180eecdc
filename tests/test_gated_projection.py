"""`gated_projection(name, x, gate, W)` = `(act(x) * gate) @ W`. Under `kernels="xla_cpu"` its backward
pass recomputes the product instead of storing it; `kernels="plain"` is autodiff of the composition.

Oracles:
- the plain kernels (the same operations composed): values and gradients to 1e-6 in float32 and
  one bf16 ulp (2**-8) in bf16 (measured on XLA:CPU: bit-equal, but for the float32 input gradient,
  ~1e-7: the backward pass multiplies by the activation's slope in another order);
- the textbook formula `(jax.nn.gelu(x, approximate=False) or jax.nn.swish(x)) * gate @ W` in float64
  (tolerance 1e-12: both sides are float64 rounding apart).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close, precision
from jax.ad_checkpoint import print_saved_residuals

from retnet_jax.layers.gated_projection import gated_projection
from retnet_jax.ops.kernels import RESOLVED_KERNELS

TEXTBOOK = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "swish": jax.nn.swish}
# x and gate `[B, T, I...]`, kernel `[I..., O]`: the retention output's heads, and the FFN's hidden units.
LAYOUTS = pytest.mark.parametrize("inputs", [(4, 16), (64,)], ids=["heads-HxDv", "ffn-F"])


def _inputs(dtype, inputs=(4, 16), outputs=24):
    rng = np.random.default_rng(3)
    x, gate = (jnp.asarray(rng.standard_normal((2, 7, *inputs)) * 2, dtype) for _ in range(2))
    kernel = jnp.asarray(rng.standard_normal((*inputs, outputs)) * 0.2, dtype)
    dy = jnp.asarray(rng.standard_normal((2, 7, outputs)), dtype)
    return x, gate, kernel, dy


def _loss(fn, dy):
    return lambda x, gate, kernel: jnp.sum(fn(x, gate, kernel).astype(jnp.float32) * dy.astype(jnp.float32))


@LAYOUTS
@pytest.mark.parametrize("name", ["gelu", "swish"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("dtype, gate_dtype, tol", [
    (jnp.float32, jnp.float32, 1e-6),
    (jnp.bfloat16, jnp.bfloat16, 2**-8),
    (jnp.bfloat16, jnp.float32, 2**-8),  # retention in a bf16 model: bf16 x, float32 normalised heads
], ids=["float32", "bfloat16", "bf16-x-float32-gate"])
def test_xla_cpu_equals_plain_autodiff(name, gated, dtype, gate_dtype, tol, inputs):
    """Values and all three gradients (in their primals' dtypes) equal the plain kernels'."""
    x, gate, kernel, dy = _inputs(dtype, inputs)
    gate = gate.astype(gate_dtype) if gated else None
    kernel = kernel.astype(jnp.float32) if gate_dtype == jnp.float32 else kernel  # float32 parameters

    def run(kernels):
        return lambda x, gate, kernel: gated_projection(name, x, gate, kernel, dtype, kernels=kernels)

    ours, plain = run("xla_cpu"), run("plain")
    got, expected = jax.jit(ours)(x, gate, kernel), jax.jit(plain)(x, gate, kernel)
    assert got.dtype == expected.dtype == dtype and got.shape == (2, 7, 24)
    assert_relative_close(got.astype(jnp.float32), expected.astype(jnp.float32), tol)
    argnums = (0, 1, 2) if gated else (0, 2)
    grads = jax.jit(jax.grad(_loss(ours, dy), argnums))(x, gate, kernel)
    expected_grads = jax.jit(jax.grad(_loss(plain, dy), argnums))(x, gate, kernel)
    for g, e, primal in zip(grads, expected_grads, [p for p in (x, gate, kernel) if p is not None]):
        assert g.dtype == e.dtype == primal.dtype
        assert_relative_close(g.astype(jnp.float32), e.astype(jnp.float32), tol)


@LAYOUTS
@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
@pytest.mark.parametrize("name", ["gelu", "swish"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_value_and_gradients_are_the_formulas_in_float64(name, gated, kernels, inputs):
    with precision(np.float64):
        x, gate, kernel, dy = _inputs(np.float64, inputs)
        gate = gate if gated else None

        def ours(x, gate, kernel):
            return gated_projection(name, x, gate, kernel, jnp.float64, kernels=kernels)

        def formula(x, gate, kernel):
            hidden = TEXTBOOK[name](x) * (1.0 if gate is None else gate)
            return hidden.reshape(*x.shape[:2], -1) @ kernel.reshape(-1, kernel.shape[-1])

        argnums = (0, 1, 2) if gated else (0, 2)
        assert_relative_close(ours(x, gate, kernel), formula(x, gate, kernel), 1e-12)
        for g, e in zip(jax.grad(_loss(ours, dy), argnums)(x, gate, kernel),
                        jax.grad(_loss(formula, dy), argnums)(x, gate, kernel)):
            assert_relative_close(g, e, 1e-12)


def test_xla_cpu_backward_pass_keeps_the_inputs_not_their_product(capsys):
    """The residuals are x, gate and the kernel (JAX's own listing of what a backward pass saves;
    the kernel's input axes flattened): no `[N, I]` array of the gated product is kept."""
    x, gate, kernel, _ = _inputs(jnp.float32)
    print_saved_residuals(lambda x, gate, kernel: jnp.sum(gated_projection(
        "swish", x, gate, kernel, jnp.float32, kernels="xla_cpu")), x, gate, kernel)
    listing = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[0] for line in listing) == ["f32[2,7,4,16]", "f32[2,7,4,16]", "f32[64,24]"], listing


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="relu"), "activation must be one of"),
    (dict(gate=jnp.ones((2, 7, 4, 8))), "gate must have the shape of x"),
    (dict(kernel=jnp.ones((4, 15, 24))), "kernel"),
    (dict(x=jnp.ones((7, 64)), gate=None), "x must be"),
])
def test_bad_arguments_are_named(kwargs, message):
    x, gate, kernel, _ = _inputs(jnp.float32)
    args = dict(name="gelu", x=x, gate=gate, kernel=kernel) | kwargs
    with pytest.raises(ValueError, match=message):
        gated_projection(args["name"], args["x"], args["gate"], args["kernel"], jnp.float32, kernels="plain")
