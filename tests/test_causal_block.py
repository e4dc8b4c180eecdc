"""`causal_block`, the in-block parallel form shared by the parallel and chunkwise forms, against
the formula written out in float64 numpy.

Oracle: `P[n, m] = (q_n . k_m) * gamma**(n - m)` for `m <= n`, else 0; `numerator = P v`,
`row_sum = P 1`, looped over the leading axes. Both are float64, so they agree to rounding
(~1e-15); tolerance 1e-12. Both kernel choices compute the same forward pass; the gradients are
covered by the forms' float64 gradient tests.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close, precision

from retnet_jax.ops import official_log_decay
from retnet_jax.ops.causal_block import causal_block
from retnet_jax.ops.decay import causal_decay_mask
from retnet_jax.ops.kernels import RESOLVED_KERNELS


@pytest.mark.parametrize("kernels", RESOLVED_KERNELS)
def test_causal_block_is_the_decayed_causal_product_and_its_row_sums(kernels):
    with precision(np.float64):
        rng = np.random.default_rng(7)
        batch, heads, chunks, block = 2, 3, 4, 9
        q, k = (rng.standard_normal((batch, heads, chunks, block, 5)) for _ in range(2))
        v = rng.standard_normal((batch, heads, chunks, block, 6))
        log_decay_h = official_log_decay(heads).astype(np.float64)

        mask = causal_decay_mask(block, jnp.asarray(log_decay_h))[:, None]
        numerator, row_sum = causal_block(*(jnp.asarray(x) for x in (q, k, v)), mask, jnp.float64,
                                          kernels=kernels)

        n, m = np.meshgrid(np.arange(block), np.arange(block), indexing="ij")
        expected_num, expected_row = np.zeros(numerator.shape), np.zeros(row_sum.shape)
        for b, h, c in np.ndindex(batch, heads, chunks):
            decay = np.where(m <= n, np.exp((n - m) * log_decay_h[h]), 0.0)
            p = (q[b, h, c] @ k[b, h, c].T) * decay
            expected_num[b, h, c], expected_row[b, h, c] = p @ v[b, h, c], p.sum(-1)
        assert_relative_close(numerator, expected_num, 1e-12)
        assert_relative_close(row_sum, expected_row, 1e-12)
