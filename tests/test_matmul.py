"""The batched matmuls of `retnet_jax.ops.matmul`: the same function and gradients as `jnp.einsum`.

Oracle: autodiff of the equivalent `einsum` (float64: agreement to 1e-12, i.e. rounding of sums of
~64 products). The hand-written backward passes only change the order of the result dimensions.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from retnet_jax.ops.matmul import matmul_nn, matmul_nt, matmul_tn, weighted_matmul_tn

# name -> (function, equivalent einsum, shape of a, shape of b); batch dims [2, 3].
CASES = {
    "nn": (matmul_nn, "bhij,bhjk->bhik", (2, 3, 5, 7), (2, 3, 7, 4)),
    "nt": (matmul_nt, "bhik,bhjk->bhij", (2, 3, 5, 7), (2, 3, 4, 7)),
    "tn": (matmul_tn, "bhji,bhjk->bhik", (2, 3, 7, 5), (2, 3, 7, 4)),
}


def _operands(shape_a, shape_b, dtype):
    ka, kb, kg = jax.random.split(jax.random.key(0), 3)
    wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
    return (jax.random.normal(ka, shape_a, wide).astype(dtype),
            jax.random.normal(kb, shape_b, wide).astype(dtype), kg)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_einsum_and_its_gradients_float64(name):
    fn, spec, shape_a, shape_b = CASES[name]
    with jax.enable_x64(True):
        a, b, kg = _operands(shape_a, shape_b, jnp.float64)
        out, vjp = jax.vjp(fn, a, b)
        ref, ref_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
        chex.assert_trees_all_close(out, ref, atol=1e-12, rtol=1e-12)
        g = jax.random.normal(kg, out.shape, jnp.float64)
        for got, want in zip(vjp(g), ref_vjp(g)):
            chex.assert_shape(got, want.shape)
            chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_operands_accumulate_in_float32_and_keep_their_dtypes(name):
    fn, spec, shape_a, shape_b = CASES[name]
    a, b, kg = _operands(shape_a, shape_b, jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: fn(a, b, jnp.float32), a, b)
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


def test_forward_mode_is_refused_with_a_clear_error_where_backward_passes_are_hand_written():
    """README, "Differentiation": chunkwise/parallel are reverse-mode only; recurrent is not."""
    from retnet_jax.ops import chunkwise_retention, official_log_decay, recurrent_retention

    q = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
    log_decay_h = official_log_decay(2)
    chunkwise = lambda q: chunkwise_retention(q, q, q, log_decay_h, chunk_size=4)[0].sum()
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(chunkwise, (q,), (q,))
    recurrent = lambda q: recurrent_retention(q, q, q, log_decay_h)[0].sum()
    _, tangent = jax.jvp(recurrent, (q,), (q,))
    reverse = jnp.vdot(jax.grad(recurrent)(q), q)  # the same directional derivative
    np.testing.assert_allclose(tangent, reverse, rtol=1e-5)


@pytest.mark.parametrize("weight_shape", [(3, 7), (2, 3, 7), (7,), (1, 7), (3, 1), (2, 1, 7), ()],
                         ids=["per-head", "full", "shared", "stretched-head", "per-head-only", "per-batch", "scalar"])
def test_weighted_matmul_tn_matches_einsum_and_its_gradients_float64(weight_shape):
    """`weighted_matmul_tn(a, w, b)` is `einsum("bhji,bhj,bhjk->bhik")` with w broadcast, and its
    gradients, the weight's (summed over the broadcast axes) included, are autodiff's (1e-12)."""
    with jax.enable_x64(True):
        a, b, kg = _operands((2, 3, 7, 5), (2, 3, 7, 4), jnp.float64)
        weight = jnp.exp(-jax.random.uniform(jax.random.key(5), weight_shape, jnp.float64))

        def reference(a, w, b):
            return jnp.einsum("bhji,bhjk->bhik", a * jnp.broadcast_to(w, a.shape[:-1])[..., None], b)

        out, vjp = jax.vjp(weighted_matmul_tn, a, weight, b)
        ref, ref_vjp = jax.vjp(reference, a, weight, b)
        chex.assert_trees_all_close(out, ref, atol=1e-12, rtol=1e-12)
        g = jax.random.normal(kg, out.shape, jnp.float64)
        for got, want in zip(vjp(g), ref_vjp(g)):
            chex.assert_shape(got, want.shape)
            chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)


def test_weighted_matmul_tn_keeps_a_not_its_weighted_copy(capsys):
    """What the backward pass saves (JAX's own listing): a, the weight and b, nothing a-sized else."""
    a, b, _ = _operands((2, 3, 7, 5), (2, 3, 7, 4), jnp.float32)
    print_saved_residuals(
        lambda a, b: weighted_matmul_tn(a, jnp.full((3, 7), 0.5), b).sum(), a, b)
    shapes = sorted(line.split()[0] for line in capsys.readouterr().out.strip().splitlines())
    assert shapes == ["f32[2,3,7,4]", "f32[2,3,7,5]", "f32[3,7]"], shapes


def test_weighted_matmul_tn_names_a_weight_that_does_not_broadcast():
    a, b, _ = _operands((2, 3, 7, 5), (2, 3, 7, 4), jnp.float32)
    with pytest.raises(ValueError, match="weight must broadcast against a's rows"):
        weighted_matmul_tn(a, jnp.ones((3, 5)), b)
