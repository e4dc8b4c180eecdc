"""The optimizer against AdamW written out by hand in float64 numpy (the oracle): global-norm
clipping, Adam's bias-corrected moments, decoupled weight decay off norms and embeddings, and the
warmup + linear decay schedule.

Tolerance 1e-12 relative: both sides compute in float64 and differ only in operation order. (optax
evaluates schedules at its int32 step count in float32, so the test's learning rates are chosen
exactly representable there: 0.0625, 0.125.)
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from retnet_jax import RetNet, RetNetConfig
from retnet_jax.train import TrainConfig
from retnet_jax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask

SHAPES = {"kernel": ((3, 4), ("embed", "mlp")), "scale": ((4,), ("norm",)),
          "table": ((5, 3), ("vocab", "embed")), "heads": ((2, 3), ("norm_heads", "head_dim"))}


def oracle_learning_rate(cfg: TrainConfig, n: int) -> float:
    """Update n (0-based): warmup peak * (n + 1) / W, then linear to peak * final at `steps`."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    if n < warmup:
        return peak * (n + 1) / warmup
    fraction = min((n - warmup) / (cfg.steps - warmup), 1.0)
    return peak + (peak * cfg.final_learning_rate - peak) * fraction


def oracle_adamw(cfg: TrainConfig, params, grads_per_step, decays):
    """AdamW (Loshchilov & Hutter; PyTorch's form: decay scaled by the learning rate) after clipping
    the gradients' global norm, step by step in float64."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for n, grads in enumerate(grads_per_step):
        norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
        scale = min(1.0, cfg.clip_norm / norm)
        t = n + 1
        lr = oracle_learning_rate(cfg, n)
        for k in params:
            g = grads[k] * scale
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g**2
            m_hat, v_hat = m[k] / (1 - cfg.b1**t), v[k] / (1 - cfg.b2**t)
            update = m_hat / (np.sqrt(v_hat) + cfg.eps) + (cfg.weight_decay * params[k] if decays[k] else 0)
            params[k] = params[k] - lr * update
    return params


def test_first_updates_equal_hand_computed_adamw_in_float64():
    cfg = TrainConfig(steps=10, warmup_steps=2, learning_rate=0.125, weight_decay=0.05, clip_norm=2.0)
    rng = np.random.default_rng(0)
    values = {k: rng.standard_normal(shape) for k, (shape, _) in SHAPES.items()}
    # Large gradients on the first step (clipped), small ones after (not clipped).
    grads = [{k: rng.standard_normal(x.shape) * s for k, x in values.items()} for s in (3.0, 0.1, 0.5)]
    with jax.enable_x64(True):
        state = nnx.State({k: nnx.Param(np.asarray(values[k]), logical_axes=names)
                           for k, (_, names) in SHAPES.items()})
        optimizer = make_optimizer(cfg, state)
        params = {k: jax.numpy.asarray(x) for k, x in values.items()}
        opt_state = optimizer.init(params)
        for g in grads:
            updates, opt_state = optimizer.update({k: jax.numpy.asarray(x) for k, x in g.items()},
                                                  opt_state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        params = jax.device_get(params)
    expected = oracle_adamw(cfg, values, grads, decays={"kernel": True, "scale": False, "table": False,
                                                        "heads": False})
    assert np.sqrt(sum(np.sum(g**2) for g in grads[0].values())) > cfg.clip_norm  # clipping exercised
    for k in values:
        assert params[k].dtype == np.float64
        assert relative_error(params[k], expected[k]) <= 1e-12, k


@pytest.mark.parametrize("schedule_cfg", [
    TrainConfig(steps=10, warmup_steps=4, learning_rate=1.0),
    TrainConfig(steps=10, warmup_steps=1, learning_rate=0.5, final_learning_rate=0.1),
    TrainConfig(steps=10, warmup_steps=0, learning_rate=2.0),
])
def test_schedule_warms_up_linearly_then_decays_linearly(schedule_cfg):
    schedule = learning_rate_schedule(schedule_cfg)
    for n in range(12):
        assert float(schedule(n)) == pytest.approx(oracle_learning_rate(schedule_cfg, n), rel=1e-6), n


def test_weight_decay_skips_norms_and_token_tables_of_the_model():
    abstract = nnx.eval_shape(lambda: RetNet(RetNetConfig.preset("tiny", norm="layernorm",
                                                                 head_norm="groupnorm"), rngs=nnx.Rngs(0)))
    mask = weight_decay_mask(nnx.state(abstract, nnx.Param))
    flat = {".".join(str(k.key) for k in path): decays
            for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == ["blocks.ffn.in_proj", "blocks.ffn.out_proj", "blocks.retention.out_proj",
                       "blocks.retention.qkvg_proj"]
    assert not flat["embed"] and not flat["unembed"] and not flat["final_norm.scale"]
