"""The jitted train step on one device: gradient accumulation, z-loss, dropout, bf16 compute.

Oracles: the same step on the whole batch at once (accumulation), the loss recomputed from the
model's logits (z-loss), the eval step (dropout off), the float32 step (bf16 compute).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from retnet_jax.sharding import make_mesh
from retnet_jax.train import TrainConfig
from retnet_jax.train.load import model_class
from retnet_jax.train.optimizer import learning_rate_schedule, make_optimizer
from retnet_jax.train.state import abstract_model, init_params, init_train_state, train_state_shardings
from retnet_jax.train.step import lm_loss, loss_and_grads, make_eval_step, make_train_step

BATCH, LENGTH, VOCAB = 8, 16, 257


def setup(cfg: TrainConfig):
    """`(step, eval_step, fresh_state)` for `cfg` on a one-device mesh; `fresh_state()` is step 0."""
    mesh = make_mesh(devices=jax.devices()[:1])
    model_cfg, cls = cfg.model_config(VOCAB), model_class(cfg.family)
    model = abstract_model(cls, model_cfg, mesh)
    optimizer = make_optimizer(cfg, model.abstract_params)
    shardings = train_state_shardings(model, optimizer, mesh)
    step = make_train_step(model, optimizer, learning_rate_schedule(cfg), shardings, mesh, mode=cfg.mode,
                           micro_batches=cfg.micro_batches, z_loss=cfg.z_loss,
                           dropout=getattr(model_cfg, "dropout", 0.0))

    def fresh_state():
        params = init_params(cls, model_cfg, mesh, seed=cfg.seed)
        return init_train_state(params, optimizer, shardings, seed=cfg.seed)

    return mesh, step, make_eval_step(model, mesh, mode=cfg.mode), fresh_state


def batch(seed: int = 0) -> dict[str, jax.Array]:
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LENGTH + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


CFG = TrainConfig(preset="tiny", steps=10, warmup_steps=0, learning_rate=1e-2, batch_size=BATCH,
                  seq_len=LENGTH)


@pytest.fixture(scope="module")
def one_batch_gradients():
    """The float32 loss and gradients of the whole batch at step 0's parameters (the oracle)."""
    mesh, _, _, fresh = setup(CFG)
    graphdef = abstract_model(model_class("retnet"), CFG.model_config(VOCAB), mesh).graphdef
    params = fresh().params
    ce, grads = jax.jit(functools.partial(loss_and_grads, graphdef, mode="chunkwise"))(
        params, batch(), jax.random.key(0))
    return graphdef, params, ce, grads


def test_gradients_of_four_micro_batches_equal_one_batch(one_batch_gradients):
    """float32; the parts' gradients are summed in another order than the batch's: 1e-5 relative
    per parameter (norm-wise)."""
    graphdef, params, ce1, grads1 = one_batch_gradients
    ce4, grads4 = jax.jit(functools.partial(loss_and_grads, graphdef, mode="chunkwise", micro_batches=4))(
        params, batch(), jax.random.key(0))
    assert relative_error(ce4, ce1) <= 1e-5
    for g4, g1 in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads1)):
        assert relative_error(g4, g1) <= 1e-5


def test_z_loss_adds_the_mean_squared_log_normaliser(one_batch_gradients):
    graphdef, params, _, _ = one_batch_gradients

    @jax.jit
    def losses_and_logits(params, inputs, targets):
        model = nnx.merge(graphdef, params)
        objective, ce = lm_loss(model, inputs, targets, mode="chunkwise", z_loss=1e-3)
        return objective, ce, model(inputs, mode="chunkwise")[0]

    data = batch()
    objective, ce, logits = losses_and_logits(params, data["inputs"], data["targets"])
    log_z = jax.nn.logsumexp(logits, axis=-1)
    expected_ce = jnp.mean(log_z - jnp.take_along_axis(logits, data["targets"][..., None], -1)[..., 0])
    assert relative_error(ce, expected_ce) <= 1e-6
    assert relative_error(objective - ce, 1e-3 * jnp.mean(log_z**2)) <= 1e-5


def test_dropout_applies_in_training_only_and_each_step_draws_new_masks():
    mesh, step, eval_step, fresh = setup(CFG.replace(model={"dropout": 0.3}, learning_rate=1e-9))
    with jax.set_mesh(mesh):
        state = fresh()
        clean = float(eval_step(state.params, batch()))
        state, first = step(state, batch())
        moved = float(eval_step(state.params, batch()))  # parameters moved by ~1e-9
        _, second = step(state, batch())
    assert moved == pytest.approx(clean, abs=1e-5)  # eval: no dropout
    assert float(first["loss"]) != pytest.approx(clean, abs=1e-3)
    assert float(second["loss"]) != pytest.approx(float(first["loss"]), abs=1e-3)  # new masks


def test_bfloat16_compute_keeps_float32_master_weights(one_batch_gradients):
    """bf16 activations: the loss within 2e-2 relative of float32 (a few bf16 ulps, 2**-8 each)."""
    mesh, step, _, fresh = setup(CFG.replace(precision="bfloat16"))
    with jax.set_mesh(mesh):
        state, metrics = step(fresh(), batch())
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert relative_error(metrics["loss"], one_batch_gradients[2]) <= 2e-2
