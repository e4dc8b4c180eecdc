"""Bad input fails early with a ValueError that names the offending argument.

Each test calls the public function eagerly (not under jit) with exactly one thing wrong and
matches the message on the argument's name.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv, random_tokens

from retnet_jax import RetNetConfig
from retnet_jax.config import literal_choices
from retnet_jax.ops import (
    chunkwise_retention,
    init_state,
    log_decay,
    official_log_decay,
    parallel_retention,
    recurrent_retention,
    retention_step,
    rotation_frequencies,
)

B, T, H, DK, DV = 2, 5, 3, 4, 6
SEQUENCE_FORMS = [
    pytest.param(parallel_retention, id="parallel"),
    pytest.param(lambda *a: chunkwise_retention(*a, chunk_size=2), id="chunkwise"),
    pytest.param(recurrent_retention, id="recurrent"),
]


@pytest.fixture
def qkv():
    return random_qkv(0, B, T, H, DK, DV)


@pytest.fixture
def log_decay_h():
    return jnp.asarray(official_log_decay(H))


# ----------------------------------------------------------------------------------------------
# Retention ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_input_of_wrong_rank_is_rejected(form, which, qkv, log_decay_h):
    """q, k or v without the head axis (rank 3 instead of [B, T, H, d]) names that argument."""
    args = list(qkv)
    args[which] = args[which][:, :, 0]
    name = "qkv"[which]
    with pytest.raises(ValueError, match=rf"^{name} must have rank 4"):
        form(*args, log_decay_h)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_step_input_with_a_time_axis_is_rejected(which, qkv, log_decay_h):
    """`retention_step` takes one token `[B, H, d]`; a `[B, T, H, d]` argument is named."""
    args = [x[:, 0] for x in qkv]
    args[which] = qkv[which]
    with pytest.raises(ValueError, match=rf"^{'qkv'[which]} must have rank 3"):
        retention_step(*args, log_decay_h)


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
def test_v_with_other_heads_than_q_is_rejected(form, qkv, log_decay_h):
    """v `[B, T, H+1, dv]` against q `[B, T, H, dk]` names v, q and the mismatched shapes."""
    q, k, _ = qkv
    v = random_qkv(1, B, T, H + 1, DK, DV)[2]
    with pytest.raises(ValueError, match=r"^v must match q on .* = \(2, 5, 3\) .* got \(2, 5, 4, 6\)"):
        form(q, k, v, log_decay_h)


@pytest.mark.parametrize("time_axis", [True, False], ids=["sequence", "step"])
def test_v_mismatch_message_spells_the_matched_axes(time_axis, qkv, log_decay_h):
    """The message lists the axes v must share with q as `[B, T, H]` (one step: `[B, H]`)."""
    q, k, _ = qkv
    v = random_qkv(1, B, T, H + 1, DK, DV)[2]
    if time_axis:
        call, axes = lambda: parallel_retention(q, k, v, log_decay_h), r"\[B, T, H\]"
    else:
        call, axes = lambda: retention_step(q[:, 0], k[:, 0], v[:, 0], log_decay_h), r"\[B, H\]"
    with pytest.raises(ValueError, match=rf"^v must match q on {axes} ="):
        call()


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
def test_k_with_another_width_than_q_is_rejected(form, qkv, log_decay_h):
    """k `[B, T, H, dk + 2]` against q `[B, T, H, dk]` names k."""
    q, _, v = qkv
    k = random_qkv(1, B, T, H, DK + 2, DV)[1]
    with pytest.raises(ValueError, match=r"^k must have the shape of q"):
        form(q, k, v, log_decay_h)


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
@pytest.mark.parametrize("shape", [(H + 1,), (1,), (), (H, 1)], ids=["H+1", "1", "scalar", "Hx1"])
def test_log_decay_of_wrong_shape_is_rejected(form, shape, qkv):
    """log_decay must be `[H]`; a wrong length, a scalar or an extra axis names log_decay."""
    with pytest.raises(ValueError, match=r"^log_decay must have shape \[H\]"):
        form(*qkv, jnp.full(shape, -0.1))


@pytest.mark.parametrize("chunk_size", [0, -4, 2.0, "4", True, None])
def test_chunk_size_must_be_a_positive_int(chunk_size, qkv, log_decay_h):
    """chunk_size <= 0 or not an int (a float, a string, a bool, None) names chunk_size."""
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive int"):
        chunkwise_retention(*qkv, log_decay_h, chunk_size=chunk_size)


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
def test_state_of_another_batch_size_is_rejected(form, qkv, log_decay_h):
    """A state for 3 sequences with inputs for 2 names the state field and the expected shape."""
    state = init_state(B + 1, H, DK, DV)
    with pytest.raises(ValueError, match=r"^state\.kv_bhkv must have shape \(2, 3, 4, 6\)"):
        form(*qkv, log_decay_h, state)


def test_step_state_of_another_batch_size_is_rejected(qkv, log_decay_h):
    """Same for `retention_step`."""
    state = init_state(B + 1, H, DK, DV)
    with pytest.raises(ValueError, match=r"^state\.kv_bhkv must have shape"):
        retention_step(*(x[:, 0] for x in qkv), log_decay_h, state)


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
def test_empty_sequence_is_rejected(form, qkv, log_decay_h):
    """T = 0 has no output to compute: the message says at least one time step is needed."""
    with pytest.raises(ValueError, match=r"at least one time step \(T >= 1\)"):
        form(*(x[:, :0] for x in qkv), log_decay_h)


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
def test_state_that_is_not_a_retention_state_is_rejected(form, qkv, log_decay_h):
    """A plain tuple in place of the state pytree names state and the expected type."""
    state = tuple(init_state(B, H, DK, DV))
    with pytest.raises(ValueError, match=r"^state must be a RetentionState or None, got tuple"):
        form(*qkv, log_decay_h, state)


def test_unknown_decay_schedule_is_rejected():
    with pytest.raises(ValueError,
                       match=r"^decay schedule must be one of \['official', 'paper', 'torchscale'\]"):
        log_decay(4, "linear")


def test_odd_key_width_has_no_rotation_pairs():
    with pytest.raises(ValueError, match=r"^key_dim must be even"):
        rotation_frequencies(7)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("d_model", 66), ("value_dim", 129)])
def test_widths_must_divide_into_heads(field, value):
    """d_model and value_dim are split into n_heads heads: a remainder names the field."""
    with pytest.raises(ValueError, match=rf"^{field}={value} must be divisible by n_heads=4"):
        RetNetConfig.preset("tiny", n_heads=4, **{field: value})


def test_key_head_width_must_be_even():
    """d_model / n_heads = 3 cannot be rotated in pairs."""
    with pytest.raises(ValueError, match=r"^d_model // n_heads = 3 must be even"):
        RetNetConfig(d_model=6, n_heads=2, value_dim=4)


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "n_layers", "n_heads", "chunk_size"])
def test_sizes_must_be_positive_ints(field):
    with pytest.raises(ValueError, match=rf"^{field} must be a positive int"):
        RetNetConfig.preset("tiny", **{field: 0})


@pytest.mark.parametrize("field", list(literal_choices(RetNetConfig)))
def test_unknown_choices_are_rejected(field):
    with pytest.raises(ValueError, match=rf"^{field} must be one of"):
        RetNetConfig.preset("tiny", **{field: "nonsense"})


def test_unknown_preset_and_unknown_override_are_rejected():
    with pytest.raises(ValueError, match=r"^unknown preset 'huge'"):
        RetNetConfig.preset("huge")
    with pytest.raises(ValueError, match=r"^unknown RetNetConfig fields \['dmodel'\]"):
        RetNetConfig.preset("tiny", dmodel=64)


# ----------------------------------------------------------------------------------------------
# Model (eager calls: the checks run before any computation)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-1, 256, 10_000], ids=["negative", "vocab_size", "far-above"])
def test_token_ids_outside_the_vocabulary_are_rejected(bad_id, tiny_model):
    """Eagerly, ids must lie in [0, vocab_size) = [0, 256); the message gives the range seen."""
    tokens = random_tokens(0, 2, 4, 256).at[1, 2].set(bad_id)
    with pytest.raises(ValueError, match=r"^tokens must lie in \[0, vocab_size\) = \[0, 256\)"):
        tiny_model(tokens)


@pytest.mark.parametrize("shape", [(4,), (1, 2, 4)], ids=["rank-1", "rank-3"])
def test_tokens_of_wrong_rank_are_rejected(shape, tiny_model):
    with pytest.raises(ValueError, match=r"^tokens must have shape \[B, T\]"):
        tiny_model(jnp.zeros(shape, jnp.int32))


def test_empty_token_sequence_is_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"^tokens must hold at least one time step"):
        tiny_model(jnp.zeros((2, 0), jnp.int32))


def test_float_tokens_are_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"^tokens must be integer ids"):
        tiny_model(jnp.zeros((1, 4), jnp.float32))


@pytest.mark.parametrize("mode", ["Parallel", "chunked", "rnn", ""])
def test_unknown_mode_is_rejected(mode, tiny_model):
    with pytest.raises(ValueError, match=r"^mode must be one of"):
        tiny_model(jnp.zeros((1, 4), jnp.int32), mode=mode)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5])
def test_model_chunk_size_must_be_a_positive_int(chunk_size, tiny_model):
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive int"):
        tiny_model(jnp.zeros((1, 4), jnp.int32), mode="chunkwise", chunk_size=chunk_size)


def test_model_state_of_another_batch_size_is_rejected(tiny_model):
    """A state made for 3 sequences, continued with 2, names state.kv_bhkv and [L, B, H, dk, dv]."""
    with pytest.raises(ValueError, match=r"^state\.kv_bhkv must have shape \[L, B, H, dk, dv\]"):
        tiny_model(jnp.zeros((2, 1), jnp.int32), mode="recurrent", state=tiny_model.init_state(3))


def test_model_state_whose_layers_disagree_on_position_is_rejected(tiny_model):
    """The model reads each sequence's position once for all layers, so a state whose layers are at
    different positions (never one a RetNet call returns) is refused, naming state.position_b."""
    state = tiny_model.init_state(2)
    state = state._replace(position_b=state.position_b.at[1, 0].set(3))
    with pytest.raises(ValueError, match=r"^state\.position_b must hold the same positions for every layer"):
        tiny_model(jnp.zeros((2, 1), jnp.int32), mode="recurrent", state=state)


def test_numpy_integer_chunk_size_is_accepted(qkv, log_decay_h):
    """A numpy integer (e.g. from a config array) is a valid chunk size, like a Python int."""
    q, k, v = qkv
    out_np, _ = chunkwise_retention(q, k, v, log_decay_h, chunk_size=np.int64(2))
    out_py, _ = chunkwise_retention(q, k, v, log_decay_h, chunk_size=2)
    chex.assert_trees_all_equal(out_np, out_py)
