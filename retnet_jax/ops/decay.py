"""Per-head decays, decay masks and the retention normaliser (SPEC sections 1 and 3).

Everything here works on `log(gamma)` in float32 (or float64): bf16 rounds the slowest gamma to 1,
and masks built as `gamma ** (n - m)` then leak the future (SPEC section 8). Masks are built from
`(n - m) * log(gamma)` with future entries set to -inf *before* `exp`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.ops.broadcast import sum_to_shape
from retnet_jax.ops.kernels import check_kernels


def official_log_decay(num_heads: int) -> np.ndarray:
    """torchscale 0.3.0: `gamma_h = 1 - 2**(-5 - h)`, returned as `log(gamma_h)`, float32 `[H]`."""
    h = np.arange(num_heads, dtype=np.float64)
    return np.log1p(-(2.0 ** (-5.0 - h))).astype(np.float32)


def torchscale_log_decay(num_heads: int) -> np.ndarray:
    """torchscale 0.3.0 bit for bit: it forms `gamma_h` in float32, where `1 - 2**(-5 - h)` rounds to
    exactly 1 for h >= 20, so those heads do not decay (log gamma = 0). Equal to
    `official_log_decay` for the first 20 heads."""
    exponent = np.float32(-5.0) - np.arange(num_heads, dtype=np.float32)
    gamma32 = np.float32(1.0) - np.float32(2.0) ** exponent
    return np.log(gamma32.astype(np.float64)).astype(np.float32)


def paper_log_decay(num_heads: int) -> np.ndarray:
    """Paper experiments: `gamma = 1 - exp(linspace(log(1/32), log(1/512), H))` as `log(gamma)`."""
    one_minus_gamma = np.exp(np.linspace(np.log(1 / 32), np.log(1 / 512), num_heads))
    return np.log1p(-one_minus_gamma).astype(np.float32)


def log_decay(num_heads: int, schedule: str = "official") -> np.ndarray:
    """`log(gamma_h)` for the named schedule: "official", "torchscale" (official as torchscale's
    float32 arithmetic rounds it: no decay from head 20 on) or "paper"."""
    schedules = {"official": official_log_decay, "torchscale": torchscale_log_decay,
                 "paper": paper_log_decay}
    if schedule not in schedules:
        raise ValueError(f"decay schedule must be one of {sorted(schedules)}, got {schedule!r}")
    return schedules[schedule](num_heads)


def causal_decay_mask(length: int, log_decay_h: jax.Array) -> jax.Array:
    """`D[h, n, m] = gamma_h ** (n - m)` for `m <= n`, else exactly 0; dtype of `log_decay_h`.

    The un-normalised decay mask (the row normaliser is applied from absolute positions later).
    """
    idx = jnp.arange(length)
    diff_nm = (idx[:, None] - idx[None, :]).astype(log_decay_h.dtype)
    exponent_hnm = diff_nm[None] * log_decay_h[:, None, None]
    causal_nm = idx[:, None] >= idx[None, :]
    return jnp.exp(jnp.where(causal_nm[None], exponent_hnm, -jnp.inf))


def _causal(scores_nm: jax.Array) -> jax.Array:
    idx = jnp.arange(scores_nm.shape[-1])
    return idx[:, None] >= idx[None, :]


def apply_causal_decay(scores_nm: jax.Array, decay_mask_nm: jax.Array, *, kernels: str) -> jax.Array:
    """`scores * D` (masks broadcast on the leading axes), future entries set to exactly 0.

    A select rather than a multiply by the zeros of `D`, so a non-finite future q or k never reaches
    earlier rows. (A non-finite future *v* still does, through `0 * NaN` in the next matmul: in the
    parallel and chunkwise forms it poisons its block or chunk. The model never feeds them one.)

    With `kernels="xla_cpu"` the backward pass keeps only the (small, unbroadcast) mask, plus the
    scores when the mask itself is differentiated, not autodiff's full-size boolean pattern and
    array of zeros.
    """
    if check_kernels(kernels) == "plain":
        return _masked_product(scores_nm, decay_mask_nm)
    return _apply_causal_decay(scores_nm, decay_mask_nm)


def _masked_product(scores_nm, decay_mask_nm):
    return jnp.where(_causal(scores_nm), scores_nm * decay_mask_nm, 0.0)


@jax.custom_vjp
def _apply_causal_decay(scores_nm: jax.Array, decay_mask_nm: jax.Array) -> jax.Array:
    return _masked_product(scores_nm, decay_mask_nm)


def _apply_causal_decay_fwd(scores_nm, decay_mask_nm):
    scores, mask = scores_nm.value, decay_mask_nm.value
    like = jnp.zeros((0,), scores.dtype)  # carries the scores' dtype
    return _apply_causal_decay(scores, mask), (mask, scores if decay_mask_nm.perturbed else None, like)


def _apply_causal_decay_bwd(residuals, g_nm):
    mask, scores, like = residuals
    if isinstance(g_nm, jax.custom_derivatives.SymbolicZero):
        return None, None
    causal = _causal(g_nm)
    d_scores = jnp.where(causal, g_nm * mask, 0.0).astype(like.dtype)
    d_mask = None
    if scores is not None:
        d_mask = sum_to_shape(jnp.where(causal, g_nm * scores, 0.0), mask.shape).astype(mask.dtype)
    return d_scores, d_mask


_apply_causal_decay.defvjp(_apply_causal_decay_fwd, _apply_causal_decay_bwd, symbolic_zeros=True)


def decay_powers(exponents_t: jax.Array, log_decay_h: jax.Array) -> jax.Array:
    """`gamma_h ** e_t` as `[T, H]` for non-negative exponents, in the dtype of `log_decay_h`."""
    return jnp.exp(exponents_t.astype(log_decay_h.dtype)[:, None] * log_decay_h[None, :])


def inverse_sqrt_normaliser(position_bt: jax.Array, log_decay_h: jax.Array) -> jax.Array:
    """`1 / sqrt(s_n)` with `s_n = sum_{j<=n} gamma**j = (1 - gamma**(n+1)) / (1 - gamma)`.

    `position_bt` holds absolute positions (int); returns `[B, T, H]` in the dtype of `log_decay_h`.
    `expm1` keeps `s_n` accurate for gamma within 2**-20 of 1 and positions up to 10**6.
    """
    n_plus_1 = (position_bt.astype(log_decay_h.dtype) + 1)[..., None]
    no_decay_h = log_decay_h == 0  # gamma = 1 (e.g. heads >= 20 of a float32 torchscale model): s_n = n+1
    safe_h = jnp.where(no_decay_h, -1.0, log_decay_h)
    s = jnp.where(no_decay_h, n_plus_1, jnp.expm1(n_plus_1 * safe_h) / jnp.expm1(safe_h))
    return jax.lax.rsqrt(s)


def normalise_rows(
    numerator_bthv: jax.Array,
    row_sum_bth: jax.Array,
    position_bt: jax.Array,
    log_decay_h: jax.Array,
) -> jax.Array:
    """Apply `D~`'s row scale and the official clamp: `o_n = a_n / max(|r_n|, 1)`.

    `numerator` is the un-normalised `sum_m gamma**(n-m) (q~_n . k~_m) v_m` and `row_sum` the matching
    `sum_m gamma**(n-m) q~_n . k~_m`; both are scaled by `1/sqrt(s_n)` and the row is divided by the
    stop-gradient `max(|row_sum|, 1)` exactly as torchscale's parallel form does.
    """
    scale_bth = inverse_sqrt_normaliser(position_bt, log_decay_h)
    row_sum_bth = row_sum_bth * scale_bth
    denominator_bth = jax.lax.stop_gradient(jnp.maximum(jnp.abs(row_sum_bth), 1.0))
    return numerator_bthv * (scale_bth / denominator_bth)[..., None]
