"""A model's blocks stacked (one module, leaves `[L, ...]`, run by `lax.scan`) or unstacked (an
`nnx.List` of per-layer modules run in Python order, with a list of per-layer states).

Stacked is how models are built and trained: compile time does not grow with depth. Unstacked is for
decoding: XLA:CPU copies each layer's slice of a stacked weight or state inside a layer scan, which
at one token per step is most of the step (experiments/PERFORMANCE.md, "Decoding with unstacked
layers"); per-layer arrays are read and updated in place. Both give the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"  # the logical axis `nnx.vmap` prepends to stacked parameters


def is_unstacked(model) -> bool:
    """Whether `model.blocks` is a list of per-layer blocks (`unstack_blocks`)."""
    return isinstance(model.blocks, nnx.List)


def unstack_blocks(model):
    """The same model with its blocks as an `nnx.List` of per-layer blocks: its parameters are copied
    out of the stack once here; the embedding, norms and output projection are shared with `model`.
    Its calls take and return states as lists of per-layer states (`unstack_state`). An unstacked
    model is returned as it is."""
    if is_unstacked(model):
        return model
    graphdef, stacked = nnx.split(model.blocks)
    layers = []
    for i in range(model.cfg.n_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda x: x[i], stacked))
        for _, variable in nnx.iter_graph(block):
            axes = variable.get_metadata().get("logical_axes") if isinstance(variable, nnx.Variable) else None
            if axes and axes[0] == LAYERS_AXIS:
                variable.set_metadata(logical_axes=axes[1:])
        layers.append(block)
    unstacked = nnx.merge(*nnx.split(model))  # a new module object holding the same arrays
    unstacked.blocks = nnx.List(layers)
    return unstacked


def unstack_state(state) -> list:
    """A stacked state (leaves `[L, B, ...]`) as a list of L per-layer states; a list unchanged."""
    if isinstance(state, list):
        return state
    n_layers = jax.tree.leaves(state)[0].shape[0]
    return [jax.tree.map(lambda x: x[i], state) for i in range(n_layers)]


def stack_state(state):
    """A list of per-layer states as one stacked state (leaves `[L, B, ...]`); a stacked one unchanged."""
    if not isinstance(state, list):
        return state
    return jax.tree.map(lambda *layers: jnp.stack(layers), *state)


def layer_zero(state, field: str) -> jax.Array:
    """`state.<field>` of layer 0, stacked or unstacked (the per-sequence position all layers share)."""
    return getattr(state[0], field) if isinstance(state, list) else getattr(state, field)[0]


def run_blocks(blocks, call: Callable[[Any, jax.Array, Any, Any], tuple[jax.Array, Any]],
               x_btd: jax.Array, state, layer_keys, remat_layer: Callable) -> tuple[jax.Array, Any]:
    """`call(block, x_btd, layer_state, key) -> (x_btd, layer_state)` through every layer.

    Stacked `blocks` (leaves `[L, ...]`): a `lax.scan` (under `remat_layer`) over the blocks, the
    state (leaves `[L, ...]`, or None) and `layer_keys` (`[L]` keys, or None). An `nnx.List` of
    blocks: a Python loop over the blocks and a list state (or None); the new state is a list.
    """
    if isinstance(blocks, nnx.List):
        n_layers = len(blocks)
        states = [None] * n_layers if state is None else state
        keys = [None] * n_layers if layer_keys is None else list(layer_keys)
        new_states = []
        for block, layer_state, key in zip(blocks, states, keys):
            x_btd, layer_state = call(block, x_btd, layer_state, key)
            new_states.append(layer_state)
        return x_btd, new_states

    graphdef, block_params = nnx.split(blocks)

    def layer(x_btd, scanned):
        params, layer_state, key = scanned
        return call(nnx.merge(graphdef, params), x_btd, layer_state, key)

    return jax.lax.scan(remat_layer(layer), x_btd, (block_params, state, layer_keys))
