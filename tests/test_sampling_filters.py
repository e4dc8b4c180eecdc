"""Choosing tokens from logits (`retnet_jax.sampling.filters`): greedy, temperature, top-k, top-p.

Oracle for sampling: the distribution written out in float64 NumPy from its definition: softmax of
`logits / temperature` over the k largest, then the fewest most likely of those whose renormalised
probabilities sum to at least p, renormalised. Empirical frequencies of N = 40,000 draws are compared
with it by Pearson's chi-square test at significance 1e-4 (degrees of freedom: the support size
minus one): a correct sampler fails it once in 10,000 seeds, and the seed is fixed. A sampler off by
a probability delta on one token moves the statistic by about N delta^2 / p: a 0.02 error on a
token of probability 0.2 adds ~80, far past the thresholds (18 to 30 here). Tokens outside the
nucleus must never be drawn, exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from retnet_jax.sampling import Sampling, check_sampling, choose_tokens

DRAWS = 40_000
SIGNIFICANCE = 1e-4
LOGITS_V = np.array([2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.8, -2.0])  # vocab 8, distinct values


def nucleus(logits_v: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The renormalised top-k / top-p distribution (float64), from the definition."""
    order = np.argsort(-logits_v)
    z = logits_v[order[:top_k]] / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    kept = 1 + int(np.sum(np.cumsum(probs)[:-1] < top_p))  # fewest reaching mass >= top_p
    out = np.zeros_like(logits_v)
    out[order[:kept]] = probs[:kept] / probs[:kept].sum()
    return out


def draw(logits_v, temperature, top_k, top_p, seed=0) -> np.ndarray:
    """`DRAWS` tokens from one row of logits, one key per draw (as rows of a batch get)."""
    logits_bv = jnp.tile(jnp.asarray(logits_v, jnp.float32)[None], (DRAWS, 1))
    keys_b = jax.random.split(jax.random.key(seed), DRAWS)
    sampling = check_sampling(temperature, top_k, top_p, logits_v.size)
    return np.asarray(jax.jit(choose_tokens)(logits_bv, keys_b, sampling))


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, 0.7),    # the nucleus alone: 3 tokens reach 0.7
    (0.5, None, 0.9),    # a sharper softmax: 3 tokens reach 0.9 (5 would at temperature 1)
    (2.0, 5, 0.8),       # top-k then top-p on a flatter softmax: 4 tokens
    (1.0, 3, None),      # top-k alone
    (1.3, None, None),   # temperature alone: all 8 tokens
])
def test_samples_follow_the_renormalised_nucleus(temperature, top_k, top_p):
    """Given 8 logits, 40,000 draws land only in the nucleus, with frequencies that pass a
    chi-square test against its renormalised probabilities."""
    vocab = LOGITS_V.size
    expected_v = nucleus(LOGITS_V, temperature, top_k or vocab, 1.0 if top_p is None else top_p)
    counts_v = np.bincount(draw(LOGITS_V, temperature, top_k, top_p), minlength=vocab)

    support = expected_v > 0
    assert counts_v[~support].sum() == 0
    statistic = np.sum((counts_v[support] - DRAWS * expected_v[support]) ** 2 / (DRAWS * expected_v[support]))
    threshold = stats.chi2.ppf(1 - SIGNIFICANCE, df=support.sum() - 1)
    assert statistic < threshold, (counts_v / DRAWS, expected_v)


def test_top_p_keeps_the_most_likely_token_even_below_its_probability():
    """`top_p` smaller than the largest probability leaves only the argmax: sampling is greedy."""
    tokens = draw(LOGITS_V, 1.0, None, 0.01)
    assert set(np.unique(tokens)) == {0}


def test_greedy_is_the_argmax_and_needs_no_key():
    """Temperature 0 picks each row's argmax whatever the keys, top-k and top-p."""
    logits_bv = jax.random.normal(jax.random.key(0), (16, 50))
    keys_b = jax.random.split(jax.random.key(1), 16)
    for top_k, top_p in ((None, None), (3, 0.5)):
        chosen = choose_tokens(logits_bv, keys_b, check_sampling(0.0, top_k, top_p, 50))
        np.testing.assert_array_equal(np.asarray(chosen), np.asarray(logits_bv.argmax(-1)))


def test_settings_are_traced_values():
    """The settings travel as arrays: one jitted program takes any of them."""
    sampling = check_sampling(0.7, 5, 0.9, 50)
    assert isinstance(sampling, Sampling)
    assert all(isinstance(x, jax.Array) and x.shape == () for x in sampling)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=51), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-0.5), "top_p"),
])
def test_bad_settings_are_refused_by_name(kwargs, match):
    settings = dict(temperature=1.0, top_k=None, top_p=None) | kwargs
    with pytest.raises(ValueError, match=match):
        check_sampling(settings["temperature"], settings["top_k"], settings["top_p"], 50)
