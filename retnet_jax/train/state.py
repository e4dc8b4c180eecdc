"""`TrainState` (parameters, optimizer state, step, RNG), its shardings, and its creation on a mesh.

Parameters are pure dicts (`nnx.to_pure_dict`) of arrays placed as the logical axis rules say; the
model's structure (`graphdef`) stays on the host and is merged back in inside the jitted step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from retnet_jax.sharding import init_sharded, state_shardings


class TrainState(NamedTuple):
    params: Any  # pure dict of float arrays (the master weights)
    opt_state: Any  # optax state; Adam's moments shaped and sharded like params
    step: jax.Array  # int32 [], optimizer steps taken
    rng: jax.Array  # uint32 [2], raw key data (checkpointable); split each step for dropout


class Model(NamedTuple):
    """What the step functions need of a model: its structure and its parameters' shardings."""

    graphdef: nnx.GraphDef
    param_shardings: Any  # pure dict of NamedSharding, shaped like TrainState.params
    abstract_params: nnx.State  # the Param state with logical-axis metadata, no values


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shapes(model: Model):
    """`jax.ShapeDtypeStruct`s shaped like `TrainState.params`."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                        nnx.to_pure_dict(model.abstract_params))


def train_state_shardings(model: Model, optimizer: optax.GradientTransformation,
                          mesh: jax.sharding.Mesh) -> TrainState:
    """Shardings of every `TrainState` leaf: Adam's moments follow their parameters; counters and
    the RNG are replicated."""
    abstract_opt = jax.eval_shape(optimizer.init, param_shapes(model))
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt, model.param_shardings,
        transform_non_params=lambda _: replicated(mesh))
    return TrainState(model.param_shardings, opt_shardings, replicated(mesh), replicated(mesh))


def abstract_model(model_cls, model_cfg, mesh: jax.sharding.Mesh) -> Model:
    """The `Model` of `model_cls(model_cfg)` on `mesh`, from shapes alone (nothing allocated)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(model_cfg, rngs=nnx.Rngs(0))),
                                   nnx.Param)
    return Model(graphdef, nnx.to_pure_dict(state_shardings(abstract, mesh)), abstract)


def init_params(model_cls, model_cfg, mesh: jax.sharding.Mesh, *, seed: int):
    """Fresh parameters (a pure dict), each created directly in its sharding (`init_sharded`)."""
    module = init_sharded(model_cls, model_cfg, mesh, seed=seed)
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def init_train_state(params, optimizer: optax.GradientTransformation, shardings: TrainState,
                     *, seed: int) -> TrainState:
    """Step 0: `params` as given, fresh optimizer state, RNG from `seed` (distinct from the
    parameters' stream: folded with a constant)."""
    def create(params):
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0x7472))  # "tr"
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), rng)

    return jax.jit(create, out_shardings=shardings, donate_argnums=0)(params)


def abstract_train_state(shardings: TrainState, model: Model,
                         optimizer: optax.GradientTransformation) -> TrainState:
    """`jax.ShapeDtypeStruct`s with shardings for every leaf: the target a checkpoint restores into."""
    shapes = TrainState(param_shapes(model), jax.eval_shape(optimizer.init, param_shapes(model)),
                        jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes, shardings)
