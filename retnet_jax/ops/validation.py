"""Shape checks shared by the retention forms: bad input fails with a ValueError naming the argument.

Shapes are static under `jax.jit`, so these checks cost nothing at run time.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from retnet_jax.ops.state import RetentionState, accumulation_dtype, init_state


def _shape(name: str, x, rank: int, layout: str) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank} with layout {layout}, got shape {shape}")
    return tuple(shape)


def check_qkv(q, k, v, log_decay_h, *, time_axis: bool = True) -> tuple[int, int, int, int, int]:
    """Validate `q, k [B, T, H, dk]`, `v [B, T, H, dv]` (no T axis for one step) and `log_decay [H]`.

    Returns `(B, T, H, dk, dv)` with `T = 1` when `time_axis` is False.
    """
    rank, layout_k, layout_v = (4, "[B, T, H, dk]", "[B, T, H, dv]") if time_axis else (
        3, "[B, H, dk]", "[B, H, dv]")
    q_shape = _shape("q", q, rank, layout_k)
    k_shape = _shape("k", k, rank, layout_k)
    v_shape = _shape("v", v, rank, layout_v)
    if k_shape != q_shape:
        raise ValueError(f"k must have the shape of q {layout_k} = {q_shape}, got {k_shape}")
    if v_shape[:-1] != q_shape[:-1]:
        raise ValueError(
            f"v must match q on {layout_v.replace(', dv', '')} = {q_shape[:-1]} (all but the width), "
            f"got {v_shape}")
    if q_shape[-1] == 0 or v_shape[-1] == 0:
        raise ValueError(f"q/k and v need non-empty head widths, got dk={q_shape[-1]}, dv={v_shape[-1]}")
    heads = q_shape[-2]
    ld_shape = getattr(log_decay_h, "shape", None)
    if ld_shape != (heads,):
        raise ValueError(f"log_decay must have shape [H] = ({heads},), got {ld_shape}")
    if time_axis:
        batch, length, _, key_dim = q_shape
    else:
        (batch, _, key_dim), length = q_shape, 1
    if time_axis and length == 0:
        raise ValueError("q, k, v must hold at least one time step (T >= 1), got T = 0")
    return batch, length, heads, key_dim, v_shape[-1]


def check_state(
    state: RetentionState | None, batch: int, heads: int, key_dim: int, value_dim: int, dtype
) -> RetentionState:
    """Return `state` cast to the accumulation dtype, or an empty one; raise on mismatched shapes."""
    acc = accumulation_dtype(dtype)
    if state is None:
        return init_state(batch, heads, key_dim, value_dim, acc)
    if not isinstance(state, RetentionState):
        raise ValueError(f"state must be a RetentionState or None, got {type(state).__name__}")
    expected = {
        "state.kv_bhkv": (batch, heads, key_dim, value_dim),
        "state.key_bhk": (batch, heads, key_dim),
        "state.position_b": (batch,),
    }
    for (name, want), got in zip(expected.items(), state):
        if tuple(got.shape) != want:
            raise ValueError(f"{name} must have shape {want} to match q, k, v, got {tuple(got.shape)}")
    return RetentionState(
        state.kv_bhkv.astype(acc), state.key_bhk.astype(acc), state.position_b.astype(jnp.int32))


def check_chunk_size(chunk_size) -> int:
    """A positive Python or numpy integer, as a Python int."""
    try:
        value = operator.index(chunk_size) if not isinstance(chunk_size, bool) else None
    except TypeError:
        value = None
    if value is None or value <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return value


def as_log_decay(log_decay_h, dtype) -> jax.Array:
    """`log(gamma)` in the accumulation dtype (never below float32)."""
    return jnp.asarray(log_decay_h, accumulation_dtype(dtype))
