"""`causal_block` (the parallel form inside a block, with a backward pass that recomputes the scores)
is the same function, with the same gradients, as autodiff of the plain composition it replaces.

Oracle: `causal_block(..., recompute=False)`, which is `matmul_nt`, `apply_causal_decay`, `matmul_nn`
and a row sum differentiated by JAX. Both run the same products in the same order, so they agree to
the last bit in float64 and float32 (tolerance 0); the mask's gradient (for learned decays) too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import precision

from retnet_jax.ops import official_log_decay
from retnet_jax.ops.causal_block import causal_block
from retnet_jax.ops.decay import causal_decay_mask


def _inputs(dtype, lead=(2, 3, 4), block=9):
    rng = np.random.default_rng(7)
    q, k = (jnp.asarray(rng.standard_normal((*lead, block, 5)), dtype) for _ in range(2))
    v, d_num = (jnp.asarray(rng.standard_normal((*lead, block, 6)), dtype) for _ in range(2))
    d_row = jnp.asarray(rng.standard_normal((*lead, block)), dtype)
    return q, k, v, d_num, d_row, jnp.asarray(official_log_decay(lead[1]), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_mask_gradient", [False, True], ids=["qkv", "qkv-and-decay"])
def test_recomputing_backward_pass_equals_autodiff_bit_for_bit(dtype, with_mask_gradient):
    with precision(dtype):
        q, k, v, d_num, d_row, log_decay_h = _inputs(dtype)

        def loss(recompute, q, k, v, log_decay_h):
            mask = causal_decay_mask(q.shape[-2], log_decay_h)[:, None]
            numerator, row_sum = causal_block(q, k, v, mask, dtype, recompute=recompute)
            return jnp.sum(numerator * d_num) + jnp.sum(row_sum * d_row)

        argnums = (1, 2, 3, 4) if with_mask_gradient else (1, 2, 3)
        got = jax.grad(loss, argnums)(True, q, k, v, log_decay_h)
        expected = jax.grad(loss, argnums)(False, q, k, v, log_decay_h)
        assert loss(True, q, k, v, log_decay_h) == loss(False, q, k, v, log_decay_h)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype == dtype
            np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_only_one_output_differentiated_and_bf16_inputs():
    """A cotangent for the numerator only (the row sums unused) and bf16 q, k, v with float32 scores:
    gradients in the inputs' dtype, equal to autodiff's."""
    q, k, v, d_num, _, log_decay_h = _inputs(np.float32)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mask = causal_decay_mask(q.shape[-2], log_decay_h)[:, None]

    def loss(recompute, q, k, v):
        return jnp.sum(causal_block(q, k, v, mask, jnp.float32, recompute=recompute)[0] * d_num)

    got = jax.grad(loss, (1, 2, 3))(True, q, k, v)
    expected = jax.grad(loss, (1, 2, 3))(False, q, k, v)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(e.astype(jnp.float32)))
