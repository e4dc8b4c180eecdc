"""One optimizer step, and one evaluation step, each a single `jax.jit` with explicit shardings.

The train step takes the whole `TrainState` donated (parameters, optimizer state, step, RNG) and a
global batch `{"inputs", "targets"}` int32 `[B, L]` sharded over the mesh's batch axes; it returns
the next state and the step's metrics. Gradients of `micro_batches` parts of the batch are summed
in a `lax.scan` (gradient accumulation), which equals one step on the whole batch because every
part has the same number of tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from retnet_jax.losses import cross_entropy
from retnet_jax.sharding import logical_spec
from retnet_jax.train.state import Model, TrainState, replicated

Batch = dict[str, jax.Array]


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows over the mesh's batch axes (data x fsdp), positions whole."""
    return NamedSharding(mesh, logical_spec(("batch", "length"), mesh_axes=mesh.axis_names))


def lm_loss(model, inputs_bt, targets_bt, *, mode: str, z_loss: float = 0.0,
            dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(objective, cross_entropy)`: mean next-token cross-entropy (nats per token, float32), plus
    `z_loss * mean(logsumexp(logits)**2)` in the objective when `z_loss > 0` (it keeps the softmax
    normaliser near 1; XLA computes the logsumexp once for both terms)."""
    kwargs = {} if dropout_key is None else {"dropout_key": dropout_key}
    logits_btv, _ = model(inputs_bt, mode=mode, **kwargs)
    ce = cross_entropy(logits_btv, targets_bt)
    if not z_loss:
        return ce, ce
    log_z_bt = jax.nn.logsumexp(logits_btv.astype(jnp.float32), axis=-1)
    return ce + z_loss * jnp.mean(jnp.square(log_z_bt)), ce


def loss_and_grads(graphdef: nnx.GraphDef, params, batch: Batch, key: jax.Array, *, mode: str,
                   micro_batches: int = 1, z_loss: float = 0.0, dropout: float = 0.0):
    """`(cross_entropy, gradients)` of the batch's objective: the gradients of `micro_batches`
    equal parts of the batch summed in a `lax.scan`, then averaged (every part has as many tokens).
    `key` draws the dropout masks (one key per part) when `dropout > 0`."""
    def objective(params, inputs_bt, targets_bt, key):
        net = nnx.merge(graphdef, params)
        return lm_loss(net, inputs_bt, targets_bt, mode=mode, z_loss=z_loss,
                       dropout_key=key if dropout > 0 else None)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if micro_batches == 1:
        (_, ce), grads = grad_fn(params, batch["inputs"], batch["targets"], key)
        return ce, grads

    # Part m holds rows m, m + M, m + 2M, ...: a reshape that keeps each device's rows local.
    def parts(x_bl):
        rows, length = x_bl.shape
        return x_bl.reshape(rows // micro_batches, micro_batches, length).swapaxes(0, 1)

    def accumulate(carry, part):
        ce_sum, grad_sum = carry
        inputs_bl, targets_bl, index = part
        (_, ce), grads = grad_fn(params, inputs_bl, targets_bl, jax.random.fold_in(key, index))
        return (ce_sum + ce, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (ce_sum, grad_sum), _ = jax.lax.scan(
        accumulate, zeros, (parts(batch["inputs"]), parts(batch["targets"]), jnp.arange(micro_batches)))
    return ce_sum / micro_batches, jax.tree.map(lambda g: g / micro_batches, grad_sum)


def make_train_step(model: Model, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, shardings: TrainState, mesh: jax.sharding.Mesh, *,
                    mode: str, micro_batches: int = 1, z_loss: float = 0.0, dropout: float = 0.0):
    """`step(state, batch) -> (state, {"loss", "grad_norm", "learning_rate"})`, jitted, state donated.

    `loss` is the cross-entropy of the batch under the parameters before the update; `grad_norm`
    the global norm of its gradient before clipping; `learning_rate` the rate this update used.
    """
    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key, dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        ce, grads = loss_and_grads(model.graphdef, state.params, batch, dropout_key, mode=mode,
                                   micro_batches=micro_batches, z_loss=z_loss, dropout=dropout)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": jnp.asarray(schedule(state.step), jnp.float32)}
        return TrainState(params, opt_state, state.step + 1, jax.random.key_data(key)), metrics

    batch_spec = {"inputs": batch_sharding(mesh), "targets": batch_sharding(mesh)}
    return jax.jit(step, in_shardings=(shardings, batch_spec),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(model: Model, mesh: jax.sharding.Mesh, *, mode: str):
    """`eval_step(params, batch) -> mean cross-entropy` (float32 []), jitted; no dropout."""
    graphdef = model.graphdef

    def evaluate(params, batch: Batch) -> jax.Array:
        net = nnx.merge(graphdef, params)
        return lm_loss(net, batch["inputs"], batch["targets"], mode=mode)[1]

    batch_spec = {"inputs": batch_sharding(mesh), "targets": batch_sharding(mesh)}
    return jax.jit(evaluate, in_shardings=(model.param_shardings, batch_spec),
                   out_shardings=replicated(mesh))


def metrics_to_host(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(metrics).items()}
