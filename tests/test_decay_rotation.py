"""Per-head decays, decay masks and the position rotation (SPEC sections 1, 2 and 8).

Oracles are the SPEC formulas evaluated in float64 numpy. Tolerances:
- float32 constants (log-decays, frequencies): rtol 2**-23, one float32 ulp (they are computed in
  float64 and rounded once).
- float32 decay masks: rtol 1e-6. `exp((n - m) * log gamma)` in float32 has relative error about
  |exponent| * 2**-24 + 1 ulp; |exponent| <= 2 for the sizes used here, so ~2e-7.
- float64 rotation: 1e-10 (angles up to 1e4 rad lose ~1e4 * 2**-52 to argument reduction).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_relative_close, precision, random_qkv, relative_error, run_form, to_f64
from retnet_jax.ops import (
    causal_decay_mask,
    inverse_sqrt_normaliser,
    log_decay,
    official_log_decay,
    paper_log_decay,
    rotate,
    rotation_frequencies,
)
from retnet_jax.ops.decay import apply_causal_decay

FLOAT32_ULP = 2.0**-23


# ----------------------------------------------------------------------------------------------
# Decay schedules
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 4, 8, 16])
def test_official_decay_is_one_minus_two_to_the_minus_five_minus_h(heads):
    """`official_log_decay(H)` is float32 `[H]` `log(1 - 2**(-5 - h))` (torchscale 0.3.0)."""
    got = official_log_decay(heads)
    chex.assert_shape(got, (heads,))
    chex.assert_type(got, np.float32)
    expected = np.log(1.0 - 2.0 ** (-5.0 - np.arange(heads)))
    np.testing.assert_allclose(got, expected, rtol=FLOAT32_ULP)


@pytest.mark.parametrize("heads", [1, 3, 8])
def test_paper_decay_spaces_one_minus_gamma_geometrically_from_1_32_to_1_512(heads):
    """`paper_log_decay(H)` is `log(gamma)` with `gamma = 1 - exp(linspace(log 1/32, log 1/512, H))`:
    the fastest head forgets at 1/32 per step and (for H > 1) the slowest at 1/512."""
    got = paper_log_decay(heads)
    chex.assert_shape(got, (heads,))
    chex.assert_type(got, np.float32)
    expected = np.log(1.0 - np.exp(np.linspace(np.log(1 / 32), np.log(1 / 512), heads)))
    np.testing.assert_allclose(got, expected, rtol=FLOAT32_ULP)
    one_minus_gamma = -np.expm1(to_f64(got))
    np.testing.assert_allclose(one_minus_gamma[0], 1 / 32, rtol=1e-6)  # float32 log, see above
    if heads > 1:
        np.testing.assert_allclose(one_minus_gamma[-1], 1 / 512, rtol=1e-6)


@pytest.mark.parametrize("schedule, function", [("official", official_log_decay),
                                                ("paper", paper_log_decay)])
def test_log_decay_selects_the_schedule_by_name(schedule, function):
    """`log_decay(H, name)` is the named schedule's function (the model's `cfg.decay`)."""
    chex.assert_trees_all_equal(log_decay(6, schedule), function(6))


# ----------------------------------------------------------------------------------------------
# Rotation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_dim", [2, 8, 32, 256])
def test_rotation_frequencies_use_linspace_not_rope_spacing(key_dim):
    """`theta_i = 1 / 10000 ** linspace(0, 1, dk // 2)` in float32: starts at 1 and (dk > 2) ends at
    exactly 1e-4, where RoPE's `10000 ** (-2i / dk)` would stop short of it."""
    got = rotation_frequencies(key_dim)
    chex.assert_shape(got, (key_dim // 2,))
    chex.assert_type(got, np.float32)
    np.testing.assert_allclose(got, 1.0 / 10000.0 ** np.linspace(0, 1, key_dim // 2),
                               rtol=FLOAT32_ULP)
    assert got[0] == 1.0
    if key_dim > 2:
        np.testing.assert_allclose(got[-1], 1e-4, rtol=FLOAT32_ULP)


def spec_rotation(x, position, theta) -> np.ndarray:
    """SPEC section 2, literally: for each pair `(x_e, x_o) = (x[2i], x[2i+1])`,
    `out_e = x_e cos(n t_i) - x_o sin(n t_i)`, `out_o = x_o cos(n t_i) + x_e sin(n t_i)`."""
    x, theta = to_f64(x), to_f64(theta)
    out = np.empty_like(x)
    batch, length = x.shape[:2]
    for b in range(batch):
        for t in range(length):
            angle = float(position[b, t]) * theta
            x_e, x_o = x[b, t, :, 0::2], x[b, t, :, 1::2]
            out[b, t, :, 0::2] = x_e * np.cos(angle) - x_o * np.sin(angle)
            out[b, t, :, 1::2] = x_o * np.cos(angle) + x_e * np.sin(angle)
    return out


def test_rotate_matches_spec_pairwise_formula():
    """Given float64 x `[B, T, H, dk]` and per-row absolute positions up to 1e4, when rotated,
    then each interleaved pair follows SPEC section 2's formula (float64 numpy oracle)."""
    with precision(jnp.float64):
        x, _, _ = random_qkv(0, 2, 5, 3, 8, 2, jnp.float64)
        position = np.array([[0, 1, 2, 3, 4], [17, 300, 4096, 9999, 10_000]])
        got = rotate(x, jnp.asarray(position), rotation_frequencies(8))
        assert_relative_close(got, spec_rotation(x, position, rotation_frequencies(8)), 1e-10)


def test_rotation_at_position_zero_is_the_identity():
    """Position 0 has angle 0: rotate leaves x bit-identical."""
    x, _, _ = random_qkv(1, 2, 3, 2, 8, 2)
    chex.assert_trees_all_equal(rotate(x, jnp.zeros((2, 3), jnp.int32), rotation_frequencies(8)), x)


def test_rotated_dot_products_depend_only_on_relative_position():
    """Given q at position n and k at position m, when both positions are shifted by the same c,
    then `q~ . k~` is unchanged (the property that lets retention be written with D[n - m]);
    float64 so that the 1e-10 tolerance above applies."""
    with precision(jnp.float64):
        q, k, _ = random_qkv(2, 1, 6, 2, 16, 2, jnp.float64)
        freqs = rotation_frequencies(16)
        n = jnp.arange(6)[None]

        def scores(shift):
            q_r, k_r = rotate(q, n + shift, freqs), rotate(k, n + shift, freqs)
            return jnp.einsum("bnhk,bmhk->bhnm", q_r, k_r)

        assert_relative_close(scores(1234), scores(0), 1e-10)


def test_bf16_rotation_computes_angles_in_float32():
    """Given bf16 x at positions near 1e6, when rotated, then the result is exactly the float32
    rotation of the same values rounded once to bf16: angles are not formed in bf16 (which would
    round position 1e6 to a multiple of 4096)."""
    x, _, _ = random_qkv(3, 1, 4, 2, 8, 2, jnp.bfloat16)
    position = jnp.asarray([[999_997, 999_998, 999_999, 1_000_000]])
    got = rotate(x, position, rotation_frequencies(8))
    chex.assert_type(got, jnp.bfloat16)
    expected = rotate(x.astype(jnp.float32), position, rotation_frequencies(8)).astype(jnp.bfloat16)
    chex.assert_trees_all_equal(got, expected)


# ----------------------------------------------------------------------------------------------
# Decay masks and the bf16 pitfall (SPEC section 8)
# ----------------------------------------------------------------------------------------------


def true_decay_mask(length: int, log_decay_h) -> np.ndarray:
    """`gamma**(n - m)` below the diagonal, 0 above, float64 (the oracle)."""
    n = np.arange(length)
    diff = (n[:, None] - n[None, :]).astype(np.float64)
    return np.where(diff >= 0, np.exp(np.maximum(diff, 0)[None] * to_f64(log_decay_h)[:, None, None]),
                    0.0)


@pytest.mark.parametrize("schedule", ["official", "paper"])
def test_causal_decay_mask_is_gamma_to_the_distance_and_exactly_zero_in_the_future(schedule):
    """`causal_decay_mask(T, log gamma)[h, n, m]` is `gamma_h**(n - m)` for m <= n (float32, rtol
    1e-6 vs float64), exactly 1 on the diagonal and exactly 0 above it."""
    log_decay_h = jnp.asarray(log_decay(8, schedule))
    mask = causal_decay_mask(64, log_decay_h)
    chex.assert_shape(mask, (8, 64, 64))
    chex.assert_type(mask, jnp.float32)
    future = np.triu(np.ones((64, 64), bool), k=1)
    assert np.all(np.asarray(mask)[:, future] == 0.0)
    assert np.all(np.diagonal(np.asarray(mask), axis1=1, axis2=2) == 1.0)
    np.testing.assert_allclose(mask, true_decay_mask(64, log_decay_h), rtol=1e-6, atol=0)


def test_bf16_rounds_the_slow_decays_to_one():
    """The pitfall's cause: bf16 has 8 significant bits, so `1 - 2**(-5 - h)` is exactly 1.0 in bf16
    for every official head h >= 4 (i.e. 1 - 2**-9 and slower), while heads 0..3 survive."""
    gamma_h = jnp.asarray(1.0 - 2.0 ** (-5.0 - np.arange(8)), jnp.bfloat16)
    rounded_to_one = np.asarray(gamma_h == 1.0)
    chex.assert_trees_all_equal(rounded_to_one, np.arange(8) >= 4)


def test_naive_bf16_power_mask_leaks_the_future_and_misweights_the_past():
    """Given the naive mask `gamma ** where(m <= n, n - m, inf)` built in bf16 (the "gamma**inf = 0"
    trick), then for heads whose gamma rounded to 1 it is 1 above the diagonal (future tokens get
    full weight) and off by more than 5% below it at distance 255 (oracle: float64 powers)."""
    length, heads = 256, 8
    gamma_bf16 = jnp.asarray(1.0 - 2.0 ** (-5.0 - np.arange(heads)), jnp.bfloat16)
    n = jnp.arange(length)
    distance = jnp.where(n[:, None] >= n[None, :], n[:, None] - n[None, :], jnp.inf)
    naive = gamma_bf16[:, None, None] ** distance.astype(jnp.bfloat16)[None]
    future = np.triu(np.ones((length, length), bool), k=1)
    assert np.all(to_f64(naive)[4:, future] == 1.0), "the naive mask should leak for h >= 4"
    truth = true_decay_mask(length, official_log_decay(heads))
    assert np.abs(to_f64(naive)[4:, -1, 0] / truth[4:, -1, 0] - 1).max() > 0.05


@pytest.mark.parametrize("log_dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_causal_decay_mask_masks_before_exp_so_the_future_is_zero_for_slow_heads(log_dtype):
    """Given the slowest official decays (gamma rounds to 1 in bf16), when the mask is built from
    `(n - m) * log gamma` with the future set to -inf before `exp`, then every future entry is
    exactly 0, even if `log gamma` itself is handed over in bf16."""
    mask = causal_decay_mask(256, jnp.asarray(official_log_decay(12), log_dtype))
    future = np.triu(np.ones((256, 256), bool), k=1)
    assert np.all(to_f64(mask)[:, future] == 0.0)
    assert np.all(np.isfinite(to_f64(mask)))


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_bf16_inputs_use_float32_decays_for_slow_heads(form):
    """Given bf16 q, k, v and 8 official heads (gamma of heads 4..7 is 1.0 in bf16), T = 256, when
    a form runs, then it matches the float32 run on the same (bf16-exact) values to 1e-2 relative.

    bf16 keeps 8 significant bits (eps 2**-8 ~ 3.9e-3): the forms round the scores and the output
    once each to bf16, so ~1-2 bf16 ulps of error is expected; measured 3.6e-3 to 3.9e-3. The
    tolerance separates that from the pitfall: the same float32 run with the gammas rounded to bf16
    (heads 4..7 at gamma = 1) is off by ~0.14 (asserted > 5e-2 below)."""
    q, k, v = random_qkv(4, 1, 256, 8, 4, 4, jnp.bfloat16)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    log_decay_h = jnp.asarray(official_log_decay(8))
    out, _ = run_form(form, q, k, v, log_decay_h, chunk_size=64)
    reference, _ = run_form(form, q32, k32, v32, log_decay_h, chunk_size=64)
    assert_relative_close(out, reference, 1e-2)

    gamma_in_bf16 = to_f64(jnp.asarray(np.exp(official_log_decay(8)), jnp.bfloat16))
    rounded_log_decay_h = jnp.asarray(np.log(gamma_in_bf16), jnp.float32)  # 0 for heads 4..7
    pitfall, _ = run_form(form, q32, k32, v32, rounded_log_decay_h, chunk_size=64)
    assert relative_error(pitfall, reference) > 5e-2


@pytest.mark.parametrize("schedule", ["official", "paper"])
def test_normaliser_is_inverse_sqrt_of_the_decay_row_sum_up_to_position_one_million(schedule):
    """`inverse_sqrt_normaliser(n, log gamma)` is `1 / sqrt(s_n)`, `s_n = sum_{j<=n} gamma**j`
    (the row sum of D, SPEC section 3), for absolute positions 0 .. 10**6 given per sequence.

    Oracle: the geometric series in float64 from the same float32 log-decays. Tolerance 1e-6: the
    float32 `expm1((n+1) log gamma)` loses |(n+1) log gamma| * 2**-24 relative before the geometric
    factor saturates; measured 1.5e-7."""
    log_decay_h = log_decay(8, schedule)
    position_bt = np.array([[0, 1, 2, 31], [1000, 4095, 100_000, 1_000_000]])
    got = inverse_sqrt_normaliser(jnp.asarray(position_bt), jnp.asarray(log_decay_h))
    chex.assert_shape(got, (2, 4, 8))
    chex.assert_type(got, jnp.float32)
    gamma = np.exp(to_f64(log_decay_h))
    row_sum = (1 - gamma[None, None, :] ** (position_bt[..., None] + 1.0)) / (1 - gamma)
    np.testing.assert_allclose(got, 1 / np.sqrt(row_sum), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[0, 0], 1.0)  # s_0 = 1


def test_normaliser_of_a_head_without_decay_is_inverse_sqrt_of_n_plus_one():
    """A head with `log gamma = 0` (gamma = 1, e.g. a float32 torchscale model with >= 20 heads)
    has `s_n = n + 1`: the normaliser is `1 / sqrt(n + 1)`, finite, not `expm1(0) / expm1(0)`.
    float32, rtol 2**-23 (one rsqrt rounding)."""
    position_bt = np.array([[0, 1, 7, 1_000_000]])
    got = inverse_sqrt_normaliser(jnp.asarray(position_bt), jnp.asarray([0.0, -0.1], jnp.float32))
    chex.assert_tree_all_finite(got)
    np.testing.assert_allclose(np.asarray(got)[..., 0], 1 / np.sqrt(position_bt + 1.0),
                               rtol=FLOAT32_ULP)


def test_torchscale_schedule_is_official_rounded_through_float32():
    """torchscale forms gamma in float32: heads 0..19 equal the official schedule exactly, and from
    head 20 on `1 - 2**(-5-h)` rounds to 1, i.e. no decay (oracle: float32 arithmetic by hand)."""
    from retnet_jax.ops import torchscale_log_decay

    chex.assert_trees_all_equal(torchscale_log_decay(32)[:20], official_log_decay(20))
    assert np.all(torchscale_log_decay(32)[20:] == 0.0)
    assert np.float32(1.0) - np.float32(2.0**-25) == np.float32(1.0)


@pytest.mark.parametrize("mask_differentiated", [False, True], ids=["scores-only", "scores-and-mask"])
def test_apply_causal_decay_xla_cpu_gradients_equal_plain_autodiff(mask_differentiated):
    """`apply_causal_decay`'s "xla_cpu" backward pass (it keeps only the small mask, plus the scores
    when the mask is differentiated) against `jax.grad` of the "plain" `where(causal, scores * D, 0)`,
    float64: the same products in the same order, so the results agree exactly."""
    with precision(np.float64):
        rng = np.random.default_rng(3)
        scores = jnp.asarray(rng.standard_normal((2, 3, 4, 9, 9)))
        cot = jnp.asarray(rng.standard_normal(scores.shape))
        log_decay_h = jnp.asarray(official_log_decay(3), jnp.float64)
        causal = np.tril(np.ones((9, 9), bool))

        def loss(kernels):
            return lambda scores, log_decay_h: jnp.sum(apply_causal_decay(
                scores, causal_decay_mask(9, log_decay_h)[:, None], kernels=kernels) * cot)

        argnums = (0, 1) if mask_differentiated else (0,)
        got = jax.grad(loss("xla_cpu"), argnums)(scores, log_decay_h)
        expected = jax.grad(loss("plain"), argnums)(scores, log_decay_h)
        for g, e in zip(got, expected):
            assert_relative_close(g, e, 1e-14)
        # The future stays exactly zero, in the value and in the scores' gradient.
        assert not np.any(np.asarray(got[0])[..., ~causal])
