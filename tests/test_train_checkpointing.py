"""The Checkpointer on small hand-made states: what it keeps, and that it restores exactly what it
saved (arrays bit for bit, the data iterator's JSON as it was)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.train.checkpointing import Checkpointer
from retnet_jax.train.state import TrainState


def state_at(step: int) -> TrainState:
    rng = np.random.default_rng(step)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.zeros((4,), jnp.bfloat16)}
    opt_state = ({"mu": jax.tree.map(jnp.ones_like, params)}, jnp.asarray(step, jnp.int32))
    return TrainState(params, opt_state, jnp.asarray(step, jnp.int32),
                      jax.random.key_data(jax.random.key(step)))


def target() -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_at(0))


def saved_steps(workdir, *, keep: int, keep_best: bool, val_losses: dict[int, float | None]) -> list[int]:
    checkpointer = Checkpointer(workdir, keep=keep, keep_best=keep_best)
    for step, val_loss in val_losses.items():
        checkpointer.save(state_at(step), {"position": step}, val_loss=val_loss)
    checkpointer.wait()
    steps = sorted(checkpointer.all_steps())
    checkpointer.close()
    return steps


def test_keeps_the_last_k(tmp_path):
    assert saved_steps(tmp_path, keep=2, keep_best=False, val_losses={1: 0.5, 2: 0.3, 3: 0.9, 4: None}) == [3, 4]


def test_keep_best_also_keeps_the_lowest_validation_loss(tmp_path):
    assert saved_steps(tmp_path, keep=1, keep_best=True, val_losses={1: 0.5, 2: 0.3, 3: 0.9, 4: None}) == [2, 4]


def test_restores_exactly_what_was_saved(tmp_path):
    saved_steps(tmp_path, keep=3, keep_best=False, val_losses={5: None, 6: None})
    checkpointer = Checkpointer(tmp_path, read_only=True)
    state, data_state = checkpointer.restore(target())
    params_only = checkpointer.restore_params(target().params, step=5)
    checkpointer.close()
    expected = state_at(6)
    assert data_state == {"position": 6}
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(params_only), jax.tree.leaves(state_at(5).params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_missing_step_is_an_error(tmp_path):
    saved_steps(tmp_path, keep=3, keep_best=False, val_losses={1: None})
    checkpointer = Checkpointer(tmp_path, read_only=True)
    with pytest.raises(FileNotFoundError):
        checkpointer.restore_params(target().params, step=7)
    checkpointer.close()
