"""No future leakage (SPEC section 8): output at position t depends only on inputs at positions <= t.

Oracle: the same computation with every input after position t replaced by fresh values. Equality is
exact (not a tolerance), in float32 and bf16: the future enters only through terms multiplied by a
decay-mask entry that is exactly 0, and adding exact zeros does not change a float sum.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FORMS, random_qkv, random_tokens, run_form
from retnet_jax.ops import official_log_decay

LENGTH, CHUNK = 10, 4
DTYPES = [pytest.param(jnp.float32, id="float32"), pytest.param(jnp.bfloat16, id="bfloat16")]
LAST_PAST = [0, 3, 6]  # first token; the last token of a chunk; mid-chunk


def replace_after(x, fresh, t: int):
    """`x` with every time step after t (axis 1) taken from `fresh`."""
    keep = (jnp.arange(x.shape[1]) <= t).reshape(1, -1, *([1] * (x.ndim - 2)))
    return jnp.where(keep, x, fresh)


@pytest.mark.parametrize("t", LAST_PAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_retention_output_up_to_t_ignores_later_tokens(form, dtype, t):
    """Given q, k, v over 10 steps (8 heads, whose slowest gammas bf16 would round to 1 were the
    decays not kept in float32), when all steps after t are replaced, then outputs at positions
    <= t are bit-identical."""
    log_decay_h = jnp.asarray(official_log_decay(8))
    qkv = random_qkv(0, 2, LENGTH, 8, 4, 4, dtype)
    fresh = random_qkv(1, 2, LENGTH, 8, 4, 4, dtype, q_scale=100.0)
    changed = tuple(replace_after(x, y, t) for x, y in zip(qkv, fresh))
    out, _ = run_form(form, *qkv, log_decay_h, chunk_size=CHUNK)
    out_changed, _ = run_form(form, *changed, log_decay_h, chunk_size=CHUNK)
    chex.assert_trees_all_equal(out_changed[:, :t + 1], out[:, :t + 1])
    assert not np.array_equal(np.asarray(out_changed[:, t + 1:]), np.asarray(out[:, t + 1:]))


@pytest.mark.parametrize("t", LAST_PAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_model_logits_up_to_t_ignore_later_tokens(mode, dtype, t, tiny_cfg, tiny_apply,
                                                  tiny_bf16_apply):
    """Given the tiny model and 10 tokens, when every token after t is changed, then the logits at
    positions <= t are bit-identical in every mode (chunks of 4 for chunkwise)."""
    apply = tiny_apply if dtype == jnp.float32 else tiny_bf16_apply
    tokens = random_tokens(0, 2, LENGTH, tiny_cfg.vocab_size)
    shift = 1 + random_tokens(1, 2, LENGTH, tiny_cfg.vocab_size - 1)  # never 0 mod vocab
    changed = replace_after(tokens, (tokens + shift) % tiny_cfg.vocab_size, t)
    logits, _ = apply(tokens, mode=mode, chunk_size=CHUNK)
    logits_changed, _ = apply(changed, mode=mode, chunk_size=CHUNK)
    chex.assert_trees_all_equal(logits_changed[:, :t + 1], logits[:, :t + 1])
    assert not np.array_equal(np.asarray(logits_changed[:, t + 1:]), np.asarray(logits[:, t + 1:]))


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent", "step"])
def test_non_finite_future_value_does_not_reach_earlier_outputs(form):
    """Given a NaN in k at position 5 (e.g. what an out-of-vocabulary id becomes under jit, or a
    bf16 overflow), when a form runs, then outputs at positions < 5 are unchanged: causality must
    not depend on the future being finite."""
    log_decay_h = jnp.asarray(official_log_decay(8))
    q, k, v = random_qkv(0, 2, LENGTH, 8, 4, 4)
    out, _ = run_form(form, q, k, v, log_decay_h, chunk_size=CHUNK)
    poisoned, _ = run_form(form, q, k.at[0, 5].set(jnp.nan), v, log_decay_h, chunk_size=CHUNK)
    chex.assert_trees_all_equal(poisoned[:, :5], out[:, :5])
