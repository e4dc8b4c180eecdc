"""Retention as pure JAX functions (no Flax): parallel, recurrent and chunkwise forms, one state.

Shape convention for every form: q, k `[B, T, H, dk]`, v `[B, T, H, dv]`, time on axis 1; the state
is a `RetentionState` (float32 sums and an int32 position per sequence). Each form takes an optional
state and returns `(output, new_state)`; all compute the same function to float rounding.
"""

from retnet_jax.ops.chunkwise import chunkwise_retention
from retnet_jax.ops.decay import (
    causal_decay_mask,
    inverse_sqrt_normaliser,
    log_decay,
    official_log_decay,
    paper_log_decay,
    torchscale_log_decay,
)
from retnet_jax.ops.parallel import parallel_retention
from retnet_jax.ops.recurrent import recurrent_retention, retention_step
from retnet_jax.ops.rotation import rotate, rotation_frequencies
from retnet_jax.ops.state import RetentionState, init_state

__all__ = [
    "RetentionState",
    "causal_decay_mask",
    "chunkwise_retention",
    "init_state",
    "inverse_sqrt_normaliser",
    "log_decay",
    "official_log_decay",
    "paper_log_decay",
    "parallel_retention",
    "recurrent_retention",
    "retention_step",
    "rotate",
    "rotation_frequencies",
    "torchscale_log_decay",
]
