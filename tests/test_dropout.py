"""Dropout (`RetNetConfig.dropout`): active only when a call passes `dropout_key`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retnet_jax import RetNet, RetNetConfig
from retnet_jax.layers.block import dropout

TOKENS = jnp.arange(40, dtype=jnp.int32).reshape(2, 20) % 256


def test_without_a_key_the_model_is_the_dropout_free_model():
    """Evaluation (no key) equals the same weights built with dropout 0, exactly."""
    with_rate, _ = RetNet(RetNetConfig.preset("tiny", dropout=0.3), rngs=nnx.Rngs(0))(TOKENS)
    without, _ = RetNet(RetNetConfig.preset("tiny"), rngs=nnx.Rngs(0))(TOKENS)
    np.testing.assert_array_equal(with_rate, without)


def test_a_key_makes_it_stochastic_and_reproducible():
    model = RetNet(RetNetConfig.preset("tiny", dropout=0.1), rngs=nnx.Rngs(0))
    first, _ = model(TOKENS, dropout_key=jax.random.key(0))
    again, _ = model(TOKENS, dropout_key=jax.random.key(0))
    other, _ = model(TOKENS, dropout_key=jax.random.key(1))
    plain, _ = model(TOKENS)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other) and not np.allclose(first, plain)


def test_dropout_zeroes_the_rate_and_rescales_the_rest():
    """Of 10**6 ones at rate 0.25, the zeroed fraction is within 5 binomial standard deviations
    (5 * sqrt(0.25 * 0.75 / 1e6) = 0.0022) of 0.25; the survivors are exactly 1 / 0.75."""
    y = np.asarray(dropout(0.25, jnp.ones((1000, 1000)), jax.random.key(0)))
    assert abs(np.mean(y == 0) - 0.25) < 0.0022
    np.testing.assert_allclose(np.unique(y[y != 0]), [1 / 0.75], rtol=1e-7)


@pytest.mark.parametrize("rate", [-0.1, 1.0, "0.1"])
def test_a_rate_outside_0_1_is_refused(rate):
    with pytest.raises(ValueError, match=r"dropout must be a rate in \[0, 1\)"):
        RetNetConfig.preset("tiny", dropout=rate)
