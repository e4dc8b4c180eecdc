"""Generation (`retnet_jax.sampling`): ragged prompts, greedy and sampled decoding, stop tokens,
streaming and compilation, for RetNet and the Transformer baseline alike.

Oracle for greedy decoding: one parallel pass over each prompt followed by its generated tokens, and
the argmax at every position. The two paths (chunkwise prefill + recurrent steps, or a cache, against
a parallel pass) agree in float32 to ~1e-6 relative on logits, far below the gap between the two
largest logits at every compared position (checked: > 1e-4), so the argmaxes must be equal.

Comparisons of one computation against another (a ragged batch against each prompt alone, chunkwise
against parallel prefill) are exact on tokens for the same reason, and 1e-5 relative on states (float32
sums over a few dozen tokens, summed in another order).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close
from flax import nnx

from retnet_jax import RetNet, RetNetConfig, generate, stream
from retnet_jax.baselines import KVCache, Transformer, TransformerConfig
from retnet_jax.layer_stack import unstack_blocks
from retnet_jax.sampling import decode

VOCAB, N_NEW = 96, 12  # vocab != d_model (64): the two widths are told apart in compiled programs
TOL32 = 1e-5
# Lengths 13 and 21 span the tiny preset's chunks of 16, so chunkwise prefills cross a chunk edge.
PROMPTS = [np.arange(5) % VOCAB + 3, (7 * np.arange(13)) % VOCAB, (5 * np.arange(21) + 1) % VOCAB]
CFG = RetNetConfig.preset("tiny", vocab_size=VOCAB)


def build(kind: str):
    if kind == "retnet":
        return RetNet(CFG, rngs=nnx.Rngs(3))
    return Transformer(TransformerConfig.from_retnet(CFG), rngs=nnx.Rngs(4))


@pytest.fixture(scope="module", params=["retnet", "transformer"])
def model(request):
    return build(request.param)


@pytest.fixture(scope="module")
def retnet():
    return build("retnet")


def parallel_pass(model):
    """`logits(tokens [B, T])`: the model's parallel pass, compiled once per shape."""
    graphdef, params = nnx.split(model)
    apply = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens, mode="parallel")[0])
    return lambda tokens: apply(params, jnp.asarray(tokens, jnp.int32))


@pytest.fixture(scope="module")
def parallel(model):
    return parallel_pass(model)


@pytest.fixture(scope="module")
def parallel_retnet(retnet):
    return parallel_pass(retnet)


def continued(prompts, tokens_bn, counts_b) -> np.ndarray:
    """Each prompt followed by its generated tokens, right-padded with 0 to one width: a causal model's
    logits at a position do not depend on what follows it."""
    rows = [np.concatenate([p, np.asarray(t)[:n]]) for p, t, n in zip(prompts, tokens_bn, counts_b)]
    out = np.zeros((len(rows), max(r.size for r in rows)), np.int32)
    for i, row in enumerate(rows):
        out[i, :row.size] = row
    return out


def test_generate_and_stream_are_the_package_names_and_no_module_shadows_them():
    """`from retnet_jax import generate` is the function (there is no `retnet_jax.generate` module)."""
    import importlib.util

    import retnet_jax
    from retnet_jax import sampling

    assert retnet_jax.generate is sampling.generate and retnet_jax.stream is sampling.stream
    assert importlib.util.find_spec("retnet_jax.generate") is None


def test_greedy_generation_is_the_argmax_continuation_of_parallel_passes(model, parallel):
    """Given prompts of lengths 5, 13, 21, greedy `generate` returns, for each sequence and step, the
    argmax of the parallel-pass logits of its prompt plus the tokens generated before."""
    out = generate(model, PROMPTS, max_new_tokens=N_NEW)

    assert out.tokens_bn.shape == (3, N_NEW) and out.tokens_bn.dtype == jnp.int32
    np.testing.assert_array_equal(out.counts_b, N_NEW)
    logits_btv = np.asarray(parallel(continued(PROMPTS, out.tokens_bn, out.counts_b)))
    for b, prompt in enumerate(PROMPTS):
        predicting_nv = logits_btv[b, prompt.size - 1:prompt.size - 1 + N_NEW]
        top2_n2 = np.sort(predicting_nv, axis=-1)[:, -2:]
        assert np.min(top2_n2[:, 1] - top2_n2[:, 0]) > 1e-4  # no near-ties: the argmax is well defined
        np.testing.assert_array_equal(np.asarray(out.tokens_bn[b]), predicting_nv.argmax(-1))


def test_prompts_of_one_length_decode_together_without_holding_states(retnet, parallel_retnet):
    """Prompts of one length and no stop id all stop at the same step, so no state is held: the
    greedy tokens are still each prompt's argmax continuation."""
    prompts = [PROMPTS[1], PROMPTS[2][:13]]
    out = generate(retnet, prompts, max_new_tokens=N_NEW)
    logits_btv = np.asarray(parallel_retnet(continued(prompts, out.tokens_bn, out.counts_b)))
    np.testing.assert_array_equal(np.asarray(out.tokens_bn), logits_btv[:, 12:12 + N_NEW].argmax(-1))


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=40, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_a_ragged_batch_gives_each_sequence_what_its_prompt_gives_alone(model, sampling):
    """Given prompts of three lengths and one key per sequence, each sequence's tokens, count and
    final state in the batch equal those of its prompt decoded alone with its key."""
    keys_b = jax.random.split(jax.random.key(11), len(PROMPTS))
    batch = generate(model, PROMPTS, max_new_tokens=N_NEW, key=keys_b, **sampling)

    for b, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], max_new_tokens=N_NEW, key=keys_b[b:b + 1], **sampling)
        np.testing.assert_array_equal(np.asarray(batch.tokens_bn[b]), np.asarray(alone.tokens_bn[0]))
        for got, want in zip(jax.tree.leaves(batch.state), jax.tree.leaves(alone.state)):
            if jnp.issubdtype(got.dtype, jnp.integer):  # positions / lengths: exact
                np.testing.assert_array_equal(np.asarray(got[:, b]), np.asarray(want[:, 0]))
            else:  # sums or keys/values; a KV cache's slots past a sequence's length are unused
                n = prompt.size + N_NEW
                got_b, want_b = (got[:, b, :, :n], want[:, 0, :, :n]) if isinstance(batch.state, KVCache) else (
                    got[:, b], want[:, 0])
                assert_relative_close(got_b, want_b, TOL32)


def test_padding_never_changes_an_output(retnet):
    """Prompts given as a padded array with `lengths` decode as the list of prompts does, whatever
    the padding holds."""
    width = max(p.size for p in PROMPTS)
    lengths = [p.size for p in PROMPTS]
    as_list = generate(retnet, PROMPTS, max_new_tokens=N_NEW)
    for fill in (0, VOCAB - 1):
        padded = np.full((len(PROMPTS), width), fill, np.int32)
        for b, p in enumerate(PROMPTS):
            padded[b, :p.size] = p
        as_array = generate(retnet, padded, lengths=lengths, max_new_tokens=N_NEW)
        np.testing.assert_array_equal(np.asarray(as_array.tokens_bn), np.asarray(as_list.tokens_bn))


def test_chunkwise_and_parallel_prefill_give_the_same_continuation(retnet):
    """Prompts of 37 to 45 tokens (a 37-token shared prefix: two chunks of 16 and a partial one)
    continue with the same greedy and sampled tokens after either prefill."""
    prompts = [(3 * np.arange(37)) % VOCAB, (11 * np.arange(40) + 2) % VOCAB, np.arange(45) % VOCAB]
    for sampling in (dict(), dict(temperature=1.0, seed=5)):
        chunkwise = generate(retnet, prompts, max_new_tokens=N_NEW, prefill="chunkwise", **sampling)
        parallel = generate(retnet, prompts, max_new_tokens=N_NEW, prefill="parallel", **sampling)
        np.testing.assert_array_equal(np.asarray(chunkwise.tokens_bn), np.asarray(parallel.tokens_bn))


def test_the_same_seed_gives_the_same_sample_and_another_seed_another(retnet):
    """At temperature 1: seed 7 twice gives the same tokens; seed 8 gives different ones; a key
    equal to `jax.random.key(7)` is seed 7; `top_k=1` at any temperature is greedy."""
    def run(**kw):
        return np.asarray(generate(retnet, PROMPTS, max_new_tokens=N_NEW, **kw).tokens_bn)

    first, again = run(temperature=1.0, seed=7), run(temperature=1.0, seed=7)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, run(temperature=1.0, key=jax.random.key(7)))
    assert not np.array_equal(first, run(temperature=1.0, seed=8))
    np.testing.assert_array_equal(run(temperature=0.7, top_k=1, seed=3), run())


def test_eos_stops_each_sequence_and_its_state_continues_exactly(model, parallel):
    """Given an id that each sequence's greedy continuation reaches at a different step: each stops
    right after it, the rest of its row is `pad_id`, its count says how many it made, and its final
    state has consumed the prompt and exactly those tokens: one more token fed to that state gives
    the parallel pass's logits."""
    free = generate(model, PROMPTS, max_new_tokens=N_NEW)
    free_bn = np.asarray(free.tokens_bn)
    eos_id = int(free_bn[0, 3])  # sequence 0 stops at step 3 at the latest
    first_b = [int(np.argmax(row == eos_id)) if eos_id in row else None for row in free_bn]
    assert len(set(first_b)) > 1, "the test needs sequences that stop at different steps"

    out = generate(model, PROMPTS, max_new_tokens=N_NEW, eos_id=eos_id, pad_id=-1)
    tokens_bn, counts_b = np.asarray(out.tokens_bn), np.asarray(out.counts_b)
    for b, first in enumerate(first_b):
        count = N_NEW if first is None else first + 1
        assert counts_b[b] == count
        np.testing.assert_array_equal(tokens_bn[b, :count], free_bn[b, :count])
        np.testing.assert_array_equal(tokens_bn[b, count:], -1)

    positions_b = np.asarray(jax.tree.leaves(out.state)[-1][0])  # position_b or length_b, layer 0
    np.testing.assert_array_equal(positions_b, [p.size + n for p, n in zip(PROMPTS, counts_b)])
    next_b = np.array([5, 6, 7], np.int32)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda params, tokens, state: nnx.merge(graphdef, params)(
        tokens, mode="recurrent", state=state)[0])
    logits_bv = step(params, jnp.asarray(next_b[:, None]), out.state)[:, 0]
    with_next_bn = np.concatenate([tokens_bn, np.zeros((3, 1), np.int32)], axis=1)
    with_next_bn[np.arange(3), counts_b] = next_b
    full_btv = parallel(continued(PROMPTS, with_next_bn, counts_b + 1))
    assert_relative_close(logits_bv, full_btv[np.arange(3), positions_b], TOL32)


def test_decoding_ends_as_soon_as_every_sequence_has_stopped(retnet):
    """With `max_new_tokens` a million and an id every greedy continuation reaches within 24 steps as
    `eos_id`, generate returns at once (a million steps would take hours), each count at most 24."""
    free = np.asarray(generate(retnet, PROMPTS, max_new_tokens=24).tokens_bn)
    shared = set(free[0]).intersection(*map(set, free[1:]))
    assert shared, "the test needs an id that every continuation reaches"
    out = generate(retnet, PROMPTS, max_new_tokens=10**6, eos_id=int(min(shared)))
    assert np.asarray(out.counts_b).max() <= 24


def test_stream_yields_generates_tokens_in_blocks(retnet):
    """`stream` over ragged prompts, sampled, with a stop id, 3 steps per block: each piece holds at
    most 3 tokens, and each sequence's pieces, joined, are `generate`'s tokens."""
    block_steps = 3
    settings = dict(max_new_tokens=N_NEW, temperature=1.0, top_p=0.9, seed=2)
    out = generate(retnet, PROMPTS, **settings)
    eos_id = int(out.tokens_bn[1, 4])
    out = generate(retnet, PROMPTS, eos_id=eos_id, **settings)

    pieces = list(stream(retnet, PROMPTS, eos_id=eos_id, block_steps=block_steps, **settings))
    assert all(len(piece) <= block_steps for step in pieces for piece in step)
    for b in range(len(PROMPTS)):
        joined = np.concatenate([step[b] for step in pieces])
        np.testing.assert_array_equal(joined, np.asarray(out.tokens_bn[b, :out.counts_b[b]]))


def test_one_compiled_decode_loop_serves_every_length_and_setting(caplog):
    """Given a fresh model, requests with contexts of 3 to 220 tokens (prompt + new), 1 to 150 new
    tokens (several blocks), and new temperatures, top-k and top-p compile `decode_block` once; the
    prefill compiles once per prompt length."""
    model = RetNet(CFG.replace(vocab_size=48), rngs=nnx.Rngs(0))  # a graph no other test compiled
    requests = [(3, 5, dict()), (9, 1, dict(temperature=0.5)), (70, 150, dict(temperature=1.3, top_k=7)),
                (3, 20, dict(temperature=0.8, top_p=0.6)), (9, 40, dict(temperature=2.0, top_p=0.3))]
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for length, n_new, sampling in requests:
            generate(model, [np.arange(length) % 48], max_new_tokens=n_new, **sampling)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert sum("jit(decode_block)" in m for m in compiled) == 1
    assert sum("jit(prefill)" in m for m in compiled) == len({length for length, _, _ in requests})


def test_the_prefill_never_forms_logits_for_the_whole_prompt(retnet):
    """The prefill's compiled program holds no `[B, T, vocab]` array: only the last position's
    logits are computed."""
    graphdef, params = nnx.split(retnet)
    tokens = jnp.zeros((2, 40), jnp.int32)
    state = unstack_blocks(retnet).init_state(2)  # per-layer, as generate passes it
    hlo = decode.prefill.lower(graphdef, params, tokens, state, mode="chunkwise",
                               chunk_size=None).as_text()
    assert f"tensor<2x40x{VOCAB}xf32>" not in hlo and f"tensor<2x1x{VOCAB}xf32>" in hlo
