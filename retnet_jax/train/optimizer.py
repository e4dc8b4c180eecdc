"""The optimizer: optax AdamW with global-norm clipping, a warmup + decay schedule, and weight decay
masked off norms and embeddings by the parameters' logical axis names."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from retnet_jax.train.config import TrainConfig

# Parameters with any of these logical axes get no weight decay: norm scales and biases, per-head
# norms, and the token tables (embedding and output projection, whose rows are the vocabulary).
NO_DECAY_AXES = frozenset({"norm", "norm_heads", "vocab"})


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate of update `n` (0-based): `learning_rate * (n + 1) / warmup_steps` during the
    warmup (so the first update already moves), then "linear" or "cosine" decay from
    `learning_rate` to `final_learning_rate * learning_rate` at update `steps`, or "constant"."""
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, cfg.steps)
    end = peak * cfg.final_learning_rate
    decay_steps = max(cfg.steps - warmup, 1)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_learning_rate)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(peak / warmup, peak, warmup - 1)
    return optax.join_schedules([ramp, decay], [warmup])


def weight_decay_mask(params: nnx.State) -> dict[str, Any]:
    """`True` where weight decay applies, as a pure dict shaped like `nnx.to_pure_dict(params)`."""
    def decays(variable: nnx.Variable) -> bool:
        return not NO_DECAY_AXES & set(variable.get_metadata().get("logical_axes") or ())

    marked = jax.tree.map(lambda v: v.replace(decays(v)), params,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(marked)


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, scaled by the learning rate as in PyTorch) after clipping the
    gradient's global norm to `clip_norm`. `params` (an abstract or concrete `nnx.State` of
    `nnx.Param`) gives the decay mask; the optimizer itself acts on pure dicts."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask(params))
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
