"""The batched matmuls of `retnet_jax.ops.matmul` compute `jnp.einsum`; under `kernels="xla_cpu"`
their hand-written backward passes give the gradients of `kernels="plain"` (ordinary autodiff).

Oracles: the equivalent `einsum` for values, the plain kernels' autodiff for gradients. float64:
agreement to 1e-12, i.e. rounding of sums of ~7 products; the hand-written backward passes only
change the order of the result dimensions.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from retnet_jax.ops.kernels import RESOLVED_KERNELS
from retnet_jax.ops.matmul import matmul_nn, matmul_nt, weighted_matmul_tn

# name -> (function, equivalent einsum, shape of a, shape of b); batch dims [2, 3].
CASES = {
    "nn": (matmul_nn, "bhij,bhjk->bhik", (2, 3, 5, 7), (2, 3, 7, 4)),
    "nt": (matmul_nt, "bhik,bhjk->bhij", (2, 3, 5, 7), (2, 3, 4, 7)),
}
WEIGHT_SHAPES = pytest.mark.parametrize(
    "weight_shape", [(3, 7), (2, 3, 7), (7,), (1, 7), (3, 1), (2, 1, 7), ()],
    ids=["per-head", "full", "shared", "stretched-head", "per-head-only", "per-batch", "scalar"])


def _operands(shape_a, shape_b, dtype):
    ka, kb, kg = jax.random.split(jax.random.key(0), 3)
    wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
    return (jax.random.normal(ka, shape_a, wide).astype(dtype),
            jax.random.normal(kb, shape_b, wide).astype(dtype), kg)


def _weighted_operands(weight_shape):
    """float64 a `[2, 3, 7, 5]`, weight in (e**-1, 1] (a decay), b `[2, 3, 7, 4]`; call under x64."""
    a, b, kg = _operands((2, 3, 7, 5), (2, 3, 7, 4), jnp.float64)
    weight = jnp.exp(-jax.random.uniform(jax.random.key(5), weight_shape, jnp.float64))
    return a, weight, b, kg


def assert_vjps_equal(fn, reference, primals, key, tol):
    """`fn` and `reference` agree in value and in every cotangent, for a random output cotangent."""
    out, vjp = jax.vjp(fn, *primals)
    expected, reference_vjp = jax.vjp(reference, *primals)
    chex.assert_trees_all_close(out, expected, atol=tol, rtol=tol)
    g = jax.random.normal(key, out.shape, out.dtype)
    for got, want in zip(vjp(g), reference_vjp(g)):
        chex.assert_shape(got, want.shape)
        chex.assert_trees_all_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_einsum_float64(name, kernels):
    fn, spec, shape_a, shape_b = CASES[name]
    with jax.enable_x64(True):
        a, b, _ = _operands(shape_a, shape_b, jnp.float64)
        chex.assert_trees_all_close(fn(a, b, kernels=kernels), jnp.einsum(spec, a, b), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_xla_cpu_gradients_equal_plain_autodiff_float64(name):
    fn, _, shape_a, shape_b = CASES[name]
    with jax.enable_x64(True):
        a, b, kg = _operands(shape_a, shape_b, jnp.float64)
        assert_vjps_equal(lambda a, b: fn(a, b, kernels="xla_cpu"), lambda a, b: fn(a, b, kernels="plain"),
                          (a, b), kg, 1e-12)


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_operands_accumulate_in_float32_and_keep_their_dtypes(name, kernels):
    fn, spec, shape_a, shape_b = CASES[name]
    a, b, kg = _operands(shape_a, shape_b, jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: fn(a, b, jnp.float32, kernels=kernels), a, b)
    assert out.dtype == jnp.float32
    ref = jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)  # exact products, float32 sums
    g = jax.random.normal(kg, out.shape, jnp.float32)
    ref_grads = jax.vjp(lambda a, b: jnp.einsum(spec, a, b),
                        a.astype(jnp.float32), b.astype(jnp.float32))[1](g)
    for got, want, primal in zip(vjp(g), ref_grads, (a, b)):
        assert got.dtype == primal.dtype
        # bf16 cotangent (8 bits of mantissa) and a bf16 result: a few bf16 ulps of ~sqrt(7)-sized sums.
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
@WEIGHT_SHAPES
def test_weighted_matmul_tn_matches_einsum_float64(weight_shape, kernels):
    """`weighted_matmul_tn(a, w, b)` is `einsum("bhji,bhj,bhjk->bhik")` with w broadcast."""
    with jax.enable_x64(True):
        a, weight, b, _ = _weighted_operands(weight_shape)
        expected = jnp.einsum("bhji,bhj,bhjk->bhik", a, jnp.broadcast_to(weight, a.shape[:-1]), b)
        chex.assert_trees_all_close(weighted_matmul_tn(a, weight, b, kernels=kernels), expected,
                                    atol=1e-12, rtol=1e-12)


@WEIGHT_SHAPES
def test_weighted_matmul_tn_xla_cpu_gradients_equal_plain_autodiff_float64(weight_shape):
    """Every gradient, the weight's (summed over its broadcast axes) included, is autodiff's (1e-12)."""
    with jax.enable_x64(True):
        a, weight, b, kg = _weighted_operands(weight_shape)
        assert_vjps_equal(lambda *p: weighted_matmul_tn(*p, kernels="xla_cpu"),
                          lambda *p: weighted_matmul_tn(*p, kernels="plain"), (a, weight, b), kg, 1e-12)


def test_weighted_matmul_tn_xla_cpu_keeps_a_not_its_weighted_copy(capsys):
    """What the backward pass saves (JAX's own listing): a, the weight and b, nothing a-sized else."""
    a, b, _ = _operands((2, 3, 7, 5), (2, 3, 7, 4), jnp.float32)
    print_saved_residuals(
        lambda a, b: weighted_matmul_tn(a, jnp.full((3, 7), 0.5), b, kernels="xla_cpu").sum(), a, b)
    shapes = sorted(line.split()[0] for line in capsys.readouterr().out.strip().splitlines())
    assert shapes == ["f32[2,3,7,4]", "f32[2,3,7,5]", "f32[3,7]"], shapes


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
def test_weighted_matmul_tn_names_a_weight_that_does_not_broadcast(kernels):
    a, b, _ = _operands((2, 3, 7, 5), (2, 3, 7, 4), jnp.float32)
    with pytest.raises(ValueError, match="weight must broadcast against a's rows"):
        weighted_matmul_tn(a, jnp.ones((3, 5)), b, kernels=kernels)


def test_an_unresolved_kernels_choice_is_refused():
    """The ops take a resolved choice: "auto" is decided once, when a model is built."""
    a, b, _ = _operands((2, 3, 5, 7), (2, 3, 7, 4), jnp.float32)
    with pytest.raises(ValueError, match="resolve 'auto' with resolve_kernels"):
        matmul_nn(a, b, kernels="auto")
