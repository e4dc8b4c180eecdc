"""torchscale 0.3.0 `incremental_state` <-> retnet_jax `RetentionState`, so a decode can move between them.

torchscale keeps, per layer `l`, `incremental_state[l] = {"prev_key_value": [B, H, dv, dk],
"scale": [H]}` after `n >= 1` tokens, with `scale = s_n = sum_{j<n} gamma**j` (float32 recurrence
`scale = gamma * scale + 1`, no batch axis) and `prev_key_value = S_n^T / sqrt(s_n)` in
value-by-key layout, `S_n = sum_m gamma**(n-1-m) k~_m^T v_m`. Before the first token the per-layer
dicts are empty.

retnet_jax keeps (with a leading layer axis) the un-normalised `kv_bhkv = S_n` `[L, B, H, dk, dv]`,
the un-normalised decayed key sum `key_bhk = sum_m gamma**(n-1-m) k~_m` `[L, B, H, dk]` and the
tokens consumed `position_b` `[L, B]`.

Two things do not carry over from torchscale:
- The position. The decoder has no step counter (it takes the position from the length of the
  token prefix it is given), so pass `position=` (robust). Without it the position is solved from
  `scale`, which works only while the slowest head's `gamma**n` is well above the float32 rounding
  of `scale`: for 2 heads up to a few hundred tokens, for 8 heads some thousands. Beyond that
  `position_from_scale` raises rather than guess.
- The key sum. torchscale's recurrent form has no abs-sum clamp (its parallel form does) and keeps no
  key sum. Without `key_sum=`, zeros are used and a `MissingKeySumWarning` is issued: the clamp
  `max(|q~_n . z_n / sqrt(s_n)|, 1)` is then evaluated without the prefix's keys. Wherever that row
  sum stays below 1 in magnitude, with or without the prefix (the clamp is inactive), the logits are
  unchanged; this is also exactly what torchscale's own recurrent form computes (it never clamps).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from retnet_jax.config import RetNetConfig
from retnet_jax.ops import RetentionState, log_decay

_EPS32 = 2.0**-24


class MissingKeySumWarning(UserWarning):
    """A torchscale state was converted without the key sum: the abs-sum clamp will not see the
    prefix's keys (see `retnet_jax.interop.state`)."""


def _config(model_or_cfg) -> RetNetConfig:
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if not isinstance(cfg, RetNetConfig):
        raise ValueError(f"expected a RetNet or a RetNetConfig, got {type(model_or_cfg).__name__}")
    return cfg


def _numpy64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        return x.detach().cpu().double().numpy()
    return np.asarray(x, np.float64)


def _scale(n, log_decay_h: np.ndarray) -> np.ndarray:
    """`s_n = sum_{j<n} gamma**j` per head (float64), the scale torchscale holds after n tokens."""
    return np.expm1(n * log_decay_h) / np.expm1(log_decay_h)


def _scale_tolerance(n: int, log_decay_h: np.ndarray) -> np.ndarray:
    """A bound on |torchscale's float32 scale - s_n|: the rounding of n float32 steps `gamma * s + 1`
    (a contraction: about `eps * s * sqrt(min(n, 1/(1-gamma)))`, taken 8x) plus the float32 rounding
    of gamma itself times `|ds/dgamma| <= min(n**2 / 2, 1 / (1-gamma)**2)`."""
    one_minus_gamma = -np.expm1(log_decay_h)
    s = _scale(n, log_decay_h)
    memory = np.minimum(float(n), 1.0 / one_minus_gamma)
    ds_dgamma = np.minimum(n * n / 2.0, one_minus_gamma**-2.0)
    return 8.0 * _EPS32 * s * np.sqrt(np.maximum(memory, 1.0)) + _EPS32 * ds_dgamma


def position_from_scale(scale, model_or_cfg) -> int:
    """The number of tokens `n >= 1` after which torchscale's per-head `scale` [H] is `s_n`.

    Solved on the slowest head (`gamma**n = 1 - s (1 - gamma)`), then checked on every head.
    Raises ValueError when `scale` fits no position, or when neighbouring positions cannot be told
    apart in float32 (the slowest head has saturated): pass the position explicitly then.
    """
    cfg = _config(model_or_cfg)
    scale_h = _numpy64(scale).reshape(-1)
    if scale_h.shape != (cfg.n_heads,):
        raise ValueError(f"scale must have shape [H] = ({cfg.n_heads},), got {tuple(_numpy64(scale).shape)}")
    log_decay_h = log_decay(cfg.n_heads, cfg.decay).astype(np.float64)
    slow = int(np.argmax(log_decay_h))
    gamma_pow_n = 1.0 + scale_h[slow] * np.expm1(log_decay_h[slow])
    hint = "pass position= (the number of tokens decoded so far, i.e. the prefix length)"
    if not np.isfinite(gamma_pow_n) or gamma_pow_n <= 0.0:
        raise ValueError(f"cannot recover the position from scale={scale_h.tolist()}: the slowest head "
                         f"has saturated at 1/(1-gamma); {hint}")
    n = int(round(np.log(gamma_pow_n) / log_decay_h[slow]))
    if n < 1:
        raise ValueError(f"scale={scale_h.tolist()} is below 1: not a torchscale decoding scale")
    tolerance = 4.0 * _scale_tolerance(n, log_decay_h) + 1e-6 * _scale(n, log_decay_h)
    off = np.abs(scale_h - _scale(n, log_decay_h))
    if np.any(off > tolerance):
        raise ValueError(f"scale={scale_h.tolist()} matches no single position for the decays of "
                         f"n_heads={cfg.n_heads} (nearest: {n} tokens); {hint}")
    step = np.exp(n * log_decay_h[slow])  # s_{n+1} - s_n on the slowest head
    if _scale_tolerance(n, log_decay_h)[slow] > 0.1 * step:
        raise ValueError(f"the position (about {n} tokens) cannot be recovered reliably from the "
                         f"float32 scale: neighbouring positions differ by {step:.3g} in the slowest "
                         f"head's scale, below its rounding; {hint}")
    return n


def _layer_states(incremental_state, n_layers: int) -> list[Mapping]:
    if isinstance(incremental_state, Mapping):
        extra = [k for k in incremental_state
                 if isinstance(k, int) and not 0 <= k < n_layers]
        if extra:
            raise ValueError(f"incremental_state has layers {sorted(extra)} beyond n_layers={n_layers}")
        return [incremental_state.get(layer, {}) for layer in range(n_layers)]
    if isinstance(incremental_state, Sequence) and len(incremental_state) == n_layers:
        return list(incremental_state)
    raise ValueError("incremental_state must be torchscale's dict {layer_index: {...}} "
                     f"for {n_layers} layers, got {type(incremental_state).__name__}")


def state_from_torchscale(
    incremental_state,
    model_or_cfg,
    *,
    position: int | None = None,
    key_sum=None,
    batch: int | None = None,
) -> RetentionState:
    """Our `RetentionState` (leading layer axis) equal to a torchscale decoder's `incremental_state`.

    Args:
      incremental_state: the dict torchscale's `RetNetDecoder` filled, `{l: {"prev_key_value",
        "scale"}}` (torch tensors or arrays); empty per-layer dicts mean nothing decoded yet.
      model_or_cfg: the converted `RetNet` or its `RetNetConfig`.
      position: tokens decoded so far (the length of the prefix passed to torchscale). None: solved
        from `scale` (see `position_from_scale`; raises where that is unreliable). When given, it is
        checked against `scale`.
      key_sum: `[L, B, H, dk]`, the un-normalised decayed key sum `sum_m gamma**(n-1-m) k~_m` of
        the prefix (e.g. `RetentionState.key_bhk` from an earlier conversion the other way). None:
        zeros, with a `MissingKeySumWarning` (the abs-sum clamp then ignores the prefix's keys).
      batch: batch size, needed only for a torchscale state with nothing decoded yet.

    Returns `RetentionState(kv_bhkv [L, B, H, dk, dv] f32, key_bhk [L, B, H, dk] f32,
    position_b [L, B] int32)`; all sequences at `position` (torchscale has one scale per batch).
    """
    cfg = _config(model_or_cfg)
    n_layers, heads, dk, dv = cfg.n_layers, cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim
    layers = _layer_states(incremental_state, n_layers)
    filled = ["prev_key_value" in st for st in layers]
    if not any(filled):
        if position not in (None, 0):
            raise ValueError(f"the torchscale state is empty (nothing decoded) but position={position}")
        if batch is None:
            raise ValueError("the torchscale state is empty: pass batch= to size the fresh state")
        return RetentionState(
            jnp.zeros((n_layers, batch, heads, dk, dv), jnp.float32),
            jnp.zeros((n_layers, batch, heads, dk), jnp.float32),
            jnp.zeros((n_layers, batch), jnp.int32))
    if not all(filled):
        raise ValueError("incremental_state has prev_key_value for layers "
                         f"{[i for i, f in enumerate(filled) if f]} only, of {n_layers}")

    kv_lbhvk = np.stack([_numpy64(st["prev_key_value"]) for st in layers])
    batch_got = kv_lbhvk.shape[1] if kv_lbhvk.ndim == 5 else None
    want = (n_layers, batch_got, heads, dv, dk)
    if kv_lbhvk.ndim != 5 or kv_lbhvk.shape != want:
        raise ValueError(f"prev_key_value must have shape [B, H, dv, dk] = [B, {heads}, {dv}, {dk}] "
                         f"in every layer, got {tuple(kv_lbhvk.shape[1:])}")
    if batch is not None and batch != batch_got:
        raise ValueError(f"batch={batch} but prev_key_value holds {batch_got} sequences")
    scale_lh = np.stack([_numpy64(st["scale"]).reshape(-1) for st in layers])
    if scale_lh.shape != (n_layers, heads):
        raise ValueError(f"scale must have {heads} entries (one per head) in every layer, "
                         f"got shape {tuple(scale_lh.shape[1:])}")
    if not np.allclose(scale_lh, scale_lh[:1], rtol=1e-6, atol=0.0):
        raise ValueError("the layers' scales differ: not one decode of one model")

    if position is None:
        position = position_from_scale(scale_lh[0], cfg)
    else:
        position = int(position)
        log_decay_h = log_decay(heads, cfg.decay).astype(np.float64)
        expected = _scale(position, log_decay_h)
        tolerance = 4.0 * _scale_tolerance(position, log_decay_h) + 1e-6 * expected
        if position < 1 or np.any(np.abs(scale_lh[0] - expected) > tolerance):
            raise ValueError(f"position={position} does not match the state's scale "
                             f"{scale_lh[0].tolist()} (expected {expected.tolist()})")

    # S_n = prev_key_value^T * sqrt(scale), with torchscale's own scale (what it divided by).
    kv = np.swapaxes(kv_lbhvk, -1, -2) * np.sqrt(scale_lh)[:, None, :, None, None]
    if key_sum is None:
        warnings.warn("torchscale's state has no key sum: converted with zeros, so the abs-sum clamp "
                      "will not see the prefix's keys (pass key_sum= to keep it exact)",
                      MissingKeySumWarning, stacklevel=2)
        key = np.zeros((n_layers, batch_got, heads, dk), np.float32)
    else:
        key = np.asarray(key_sum, np.float32)
        if key.shape != (n_layers, batch_got, heads, dk):
            raise ValueError(f"key_sum must have shape [L, B, H, dk] = "
                             f"{(n_layers, batch_got, heads, dk)}, got {key.shape}")
    return RetentionState(
        jnp.asarray(kv, jnp.float32),
        jnp.asarray(key, jnp.float32),
        jnp.full((n_layers, batch_got), position, jnp.int32))


def state_to_torchscale(state: RetentionState, model_or_cfg, *, dtype=None) -> dict[int, dict]:
    """torchscale's `incremental_state` for our `state` (drops the key sum, which it has no use for).

    All sequences must be at the same position (torchscale's `scale` has no batch axis). Continue
    the decode by passing torchscale the whole prefix of `position + 1` tokens (it takes the
    position from the prefix length). `dtype`: torch dtype of the tensors (default float32).
    Returns `{l: {"prev_key_value": [B, H, dv, dk], "scale": [H]}}`, or empty per-layer dicts at
    position 0.
    """
    import torch

    cfg = _config(model_or_cfg)
    n_layers, heads, dk, dv = cfg.n_layers, cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim
    if not isinstance(state, RetentionState):
        raise ValueError(f"state must be a RetentionState, got {type(state).__name__}")
    kv = np.asarray(state.kv_bhkv, np.float64)
    positions = np.asarray(state.position_b)
    if kv.ndim != 5 or kv.shape[0] != n_layers or kv.shape[2:] != (heads, dk, dv):
        raise ValueError(f"state.kv_bhkv must have shape [L, B, H, dk, dv] = "
                         f"[{n_layers}, B, {heads}, {dk}, {dv}], got {kv.shape}")
    if positions.shape != kv.shape[:2]:
        raise ValueError(f"state.position_b must have shape [L, B] = {kv.shape[:2]}, got {positions.shape}")
    distinct = np.unique(positions)
    if distinct.size > 1:
        raise ValueError("torchscale keeps one scale for the whole batch, so every sequence must be at "
                         f"the same position; this state holds positions {distinct.tolist()}")
    position = int(distinct[0]) if distinct.size else 0
    if position == 0:
        return {layer: {} for layer in range(n_layers)}
    dtype = torch.float32 if dtype is None else dtype
    scale_h = _scale(position, log_decay(heads, cfg.decay).astype(np.float64))
    kv_lbhvk = np.swapaxes(kv, -1, -2) / np.sqrt(scale_h)[None, None, :, None, None]
    return {
        layer: {
            "prev_key_value": torch.from_numpy(np.ascontiguousarray(kv_lbhvk[layer])).to(dtype),
            "scale": torch.from_numpy(scale_h.copy()).to(dtype),
        }
        for layer in range(n_layers)
    }
