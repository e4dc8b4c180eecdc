"""The RetNet language model: embedding, a scanned stack of blocks, final norm, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax.config import Mode, RetNetConfig, check_mode
from retnet_jax.layers.block import RetNetBlock, dropout
from retnet_jax.layers.fused import unembed
from retnet_jax.layers.norms import Norm
from retnet_jax.layer_stack import is_unstacked, layer_zero, run_blocks
from retnet_jax.ops import RetentionState, init_state
from retnet_jax.ops.kernels import resolve_kernels
from retnet_jax.ops.validation import check_chunk_size
from retnet_jax.sharding import constrain

# Stacked layers get a leading "layers" logical axis on every parameter.
LAYER_METADATA = {nnx.PARTITION_NAME: None, "logical_axes": "layers"}


class RetNet(nnx.Module):
    """`model(tokens [B, T], mode=..., state=None) -> (logits [B, T, vocab] float32, state)`.

    The blocks are created with `nnx.vmap` and run with `jax.lax.scan`, so compile time does not grow
    with depth. The state is a `RetentionState` whose arrays carry a leading layer axis `[L, ...]`.
    `retnet_jax.layer_stack.unstack_blocks(model)` gives the model for decoding: per-layer blocks,
    and states as lists of per-layer `RetentionState`s.
    """

    def __init__(self, cfg: RetNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernels = resolve_kernels(cfg.kernels)
        self.embed = embedding_table(cfg, rngs)
        self.embed_norm = Norm.for_model(cfg) if cfg.embedding_norm else None

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_METADATA)
        def make_blocks(rngs: nnx.Rngs) -> RetNetBlock:
            return RetNetBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        # DeepNet blocks end in a norm already; there is no final norm then (as in torchscale).
        self.final_norm = None if cfg.deepnorm else Norm.for_model(cfg)
        # Output projection stored [vocab, d] like the embedding (and torch's Linear): the backward
        # pass then needs no transposed copy of the [T, vocab] logit gradient.
        self.unembed = None if cfg.tie_embeddings else embedding_table(cfg, rngs)

    def init_state(self, batch: int, capacity: int | None = None) -> RetentionState:
        """An empty state for `batch` sequences: `[L, B, H, dk, dv]` sums, positions `[L, B]` at 0.

        `capacity` is ignored (a retention state does not grow); it is there so that generic code can
        call RetNet and the Transformer baseline (whose KV cache has a capacity) alike.
        """
        cfg = self.cfg
        def empty():
            return init_state(batch, cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim)
        if is_unstacked(self):
            return [empty() for _ in range(cfg.n_layers)]
        return per_layer(empty(), cfg.n_layers)

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        mode: Mode = "parallel",
        state: RetentionState | None = None,
        chunk_size: int | None = None,
        last_only: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, RetentionState]:
        """Logits for `tokens [B, T]` (int), continuing from `state` (None: a fresh sequence).

        mode: "parallel" (O(T**2) training form), "chunkwise" (linear, chunks of `chunk_size`, default
        `cfg.chunk_size`) or "recurrent" (token by token; decoding). All three give the same logits
        to float rounding.

        state: what a previous call returned (or `init_state`), leaves `[L, B, ...]`. Sequences may be
        at different positions; the layers of one sequence are always at the same one, and the
        position is read from the first layer (a concrete state that breaks this is refused).

        last_only: return the logits of the last position only, `[B, 1, vocab]` (a prefill needs
        no more; the `[B, T, vocab]` array is never formed).

        dropout_key: a PRNG key to apply `cfg.dropout` (training); None (default): no dropout.
        """
        cfg = self.cfg
        tokens_bt = check_tokens(tokens_bt, cfg.vocab_size)
        check_mode(mode)
        chunk_size = check_chunk_size(cfg.chunk_size if chunk_size is None else chunk_size)
        batch = tokens_bt.shape[0]
        state = self.init_state(batch) if state is None else _check_model_state(state, self, batch)

        # Ids outside the vocabulary can only reach here traced (under jit). Their logits, and those
        # of every later position and call of that sequence, become NaN: never a silent clamp.
        invalid_bt = (tokens_bt < 0) | (tokens_bt >= cfg.vocab_size)
        x_btd, layer_keys = embed_tokens(cfg, self.embed[...], self.embed_norm, tokens_bt, dropout_key)

        # A model state advances all its layers together, so they share one position per sequence.
        # Taken outside the layer loop, it makes the rotation angles (and every other function of
        # position alone) loop-invariant: computed once, not stacked per layer.
        position_b = layer_zero(state, "position_b")

        def layer(block, x_btd, layer_state, key):
            layer_state = layer_state._replace(position_b=position_b)
            return block(x_btd, layer_state, mode=mode, chunk_size=chunk_size, dropout_key=key)

        x_btd, state = run_blocks(self.blocks, layer, x_btd, state, layer_keys,
                                  lambda fn: remat_layer(fn, cfg.remat))

        if self.final_norm is not None:
            x_btd = self.final_norm(x_btd)
        x_btd, state = _poison_after_invalid(x_btd, state, invalid_bt)
        if last_only:
            x_btd = x_btd[:, -1:]
        unembed_vd = self.embed[...] if self.unembed is None else self.unembed[...]
        logits_btv = unembed(x_btd, unembed_vd, cfg.dtype, kernels=self.kernels)
        return constrain(logits_btv, ("batch", "length", "vocab")), state


# Names the layers give (with `jax.ad_checkpoint.checkpoint_name`) to the activations that
# remat="projections" keeps for the backward pass.
SAVED_ACTIVATIONS = ("projections", "retention", "ffn_in")


def per_layer(state, n_layers: int):
    """One layer's state broadcast to a model's: every leaf gets a leading `[L]` axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n_layers, *x.shape)), state)


def embed_tokens(cfg, table_vd: jax.Array, embed_norm, tokens_bt: jax.Array, dropout_key=None
                 ) -> tuple[jax.Array, jax.Array | None]:
    """`[B, T, d]` inputs of the first block (lookup, optional sqrt(d) scale and norm, dropout), and
    one dropout key per layer (None without dropout). Shared by RetNet and the Transformer baseline.

    Ids are clipped into the table here; callers poison the outputs of invalid ids.
    """
    # The table's width gathered first (as FSDP gathers every weight): a lookup into a table
    # split on both axes is one XLA's partitioner can only do by replicating it.
    table_vd = constrain(table_vd, ("vocab", None))
    x_btd = jnp.take(table_vd, tokens_bt, axis=0, mode="clip")
    x_btd = constrain(x_btd.astype(cfg.dtype), ("batch", "length", "embed"))
    if cfg.scale_embedding:
        x_btd = x_btd * jnp.asarray(np.sqrt(cfg.d_model), cfg.dtype)
    if embed_norm is not None:
        x_btd = embed_norm(x_btd)
    if dropout_key is None or cfg.dropout == 0.0:
        return x_btd, None
    embed_key, layers_key = jax.random.split(dropout_key)
    return dropout(cfg.dropout, x_btd, embed_key), jax.random.split(layers_key, cfg.n_layers)


def embedding_table(cfg, rngs: nnx.Rngs) -> nnx.Param:
    """A `[vocab, d]` table drawn from `N(0, 1/d)` (torchscale's embedding and output projection)."""
    d = cfg.d_model
    table = jax.random.normal(rngs.params(), (cfg.vocab_size, d), jnp.float32) * d**-0.5
    return nnx.Param(table.astype(cfg.param_dtype), logical_axes=("vocab", "embed"))


def remat_layer(layer, remat: str):
    """`layer` under `jax.checkpoint` with the policy `RetNetConfig.remat` names (its memory and
    speed costs are measured in experiments/PERFORMANCE.md)."""
    if remat == "none":
        return layer
    policy = (jax.checkpoint_policies.nothing_saveable if remat == "full"
              else jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS))
    return jax.checkpoint(layer, policy=policy, prevent_cse=False)


def check_tokens(tokens_bt, vocab_size: int) -> jax.Array:
    """`tokens` as an int array `[B, T]`, T >= 1, ids in `[0, vocab_size)` (checked when concrete)."""
    tokens_bt = jnp.asarray(tokens_bt)
    if tokens_bt.ndim != 2:
        raise ValueError(f"tokens must have shape [B, T] (batch, time), got {tokens_bt.shape}")
    if not jnp.issubdtype(tokens_bt.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens_bt.dtype}")
    if tokens_bt.shape[1] == 0:
        raise ValueError("tokens must hold at least one time step, got T = 0")
    try:  # concrete ids (also when closed over under jit) are checked here; traced ones cannot be
        host_bt = np.asarray(tokens_bt)
    except jax.errors.TracerArrayConversionError:
        host_bt = None
    if host_bt is not None:
        low, high = int(host_bt.min()), int(host_bt.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"tokens must lie in [0, vocab_size) = [0, {vocab_size}), got ids in [{low}, {high}]")
    return tokens_bt


def _poison_after_invalid(x_btd, state, invalid_bt):
    """NaN features (hence NaN logits) from a sequence's first invalid id on, and a NaN normaliser
    state for that sequence (every later output of it divides by that state). Applied to the `[B, T, d]`
    features, not the `[B, T, vocab]` logits, and to the `[B, H, dk]` key sums, not the `[B, H, dk, dv]`
    state: the selects then cost little beside the step."""
    poisoned_bt = jnp.cumsum(invalid_bt, axis=1) > 0
    x_btd = jnp.where(poisoned_bt[..., None], jnp.nan, x_btd)
    poisoned_b11 = poisoned_bt[:, -1, None, None]  # right-aligned: against [L, B, H, dk] or [B, H, dk]

    def poison(layer_state: RetentionState) -> RetentionState:
        return layer_state._replace(key_bhk=jnp.where(poisoned_b11, jnp.nan, layer_state.key_bhk))

    return x_btd, ([poison(s) for s in state] if isinstance(state, list) else poison(state))


def _check_model_state(state, model: RetNet, batch: int):
    """`state` checked against the model: a stacked `RetentionState` (leaves `[L, B, ...]`), or for an
    unstacked model a list of L per-layer ones (leaves `[B, ...]`)."""
    cfg = model.cfg
    layers, heads, dk, dv = cfg.n_layers, cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim
    shapes = {"kv_bhkv": ((batch, heads, dk, dv), "B, H, dk, dv"),
              "key_bhk": ((batch, heads, dk), "B, H, dk"),
              "position_b": ((batch,), "B")}
    if is_unstacked(model):
        if not isinstance(state, list) or len(state) != layers:
            raise ValueError(f"state of a model with unstacked layers must be a list of {layers} per-layer "
                             f"RetentionStates (layer_stack.unstack_state), got {type(state).__name__}")
        prefix, layer_states = "state[i].", state
    else:
        prefix, layer_states = "state.", [state]
        shapes = {name: ((layers, *want), f"L, {names}") for name, (want, names) in shapes.items()}
    for layer_state in layer_states:
        if not isinstance(layer_state, RetentionState):
            raise ValueError(f"state must be the RetentionState a RetNet call returned, got "
                             f"{type(layer_state).__name__}")
        for name, (want, names) in shapes.items():
            got = tuple(getattr(layer_state, name).shape)
            if got != want:
                raise ValueError(f"{prefix}{name} must have shape [{names}] = {want} for this model and "
                                 f"tokens of batch {batch}, got {got}")
    positions = [s.position_b for s in layer_states]
    if not any(isinstance(p, jax.core.Tracer) for p in positions):  # concrete: checkable here
        position_lb = np.concatenate([np.asarray(p).reshape(-1, batch) for p in positions])
        if not np.all(position_lb == position_lb[:1]):
            raise ValueError(f"{prefix}position_b must hold the same positions for every layer (a model "
                             f"state advances its layers together), got {position_lb.tolist()}")
    return state
