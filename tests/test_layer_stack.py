"""Unstacked layers (`retnet_jax.layer_stack`): the decoding layout gives the stacked model's numbers,
and its compiled decode loop reads each weight and updates each layer's state in place.

Oracle: the same model with its layers stacked (one `lax.scan`), as built and trained. Tolerance: the
two layouts fuse their float32 arithmetic differently (measured ~3e-6 on logits of size ~1), so 2e-5
relative; states converted between the layouts are compared exactly.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retnet_jax import RetNet, RetNetConfig
from retnet_jax.baselines import Transformer, TransformerConfig
from retnet_jax.layer_stack import is_unstacked, stack_state, unstack_blocks, unstack_state

CFG = RetNetConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=2, value_dim=64, ffn_dim=64, chunk_size=4)
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def retnet():
    return RetNet(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def transformer():
    return Transformer(TransformerConfig.from_retnet(CFG), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(3), (2, 11), 0, CFG.vocab_size)


def test_unstack_blocks_copies_each_layer_and_drops_the_layers_axis(retnet):
    unstacked = unstack_blocks(retnet)
    assert is_unstacked(unstacked) and not is_unstacked(retnet) and unstack_blocks(unstacked) is unstacked
    _, stacked = nnx.split(retnet.blocks, nnx.Param)
    for i, block in enumerate(unstacked.blocks):
        _, layer = nnx.split(block, nnx.Param)
        for want, got in zip(jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)),
                             jax.tree.leaves(layer, is_leaf=lambda x: isinstance(x, nnx.Variable))):
            np.testing.assert_array_equal(got[...], want[...][i])
            assert got.get_metadata()["logical_axes"] == want.get_metadata()["logical_axes"][1:]
    assert unstacked.embed is retnet.embed  # shared, not copied


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_an_unstacked_retnet_gives_the_stacked_models_logits_and_state(retnet, tokens, mode):
    want_logits, want_state = retnet(tokens, mode=mode)
    got_logits, got_state = unstack_blocks(retnet)(tokens, mode=mode)
    assert isinstance(got_state, list) and len(got_state) == CFG.n_layers
    np.testing.assert_allclose(got_logits, want_logits, **TOL)
    for got, want in zip(jax.tree.leaves(stack_state(got_state)), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(got, want, **TOL)


def test_an_unstacked_retnet_continues_from_a_converted_state(retnet, tokens):
    """Prefill stacked, convert the state, continue unstacked (what `generate` does)."""
    want, _ = retnet(tokens, mode="parallel")
    _, state = retnet(tokens[:, :7], mode="chunkwise")
    got, _ = unstack_blocks(retnet)(tokens[:, 7:], mode="recurrent", state=unstack_state(state))
    np.testing.assert_allclose(got, want[:, 7:], **TOL)


def test_an_unstacked_transformer_gives_the_stacked_models_logits_and_cache(transformer, tokens):
    want_logits, want_cache = transformer(tokens)
    got_logits, got_cache = unstack_blocks(transformer)(tokens)
    np.testing.assert_allclose(got_logits, want_logits, **TOL)
    for got, want in zip(jax.tree.leaves(stack_state(got_cache)), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(got, want, **TOL)
    decoder = unstack_blocks(transformer)
    cache = decoder.init_state(2, 16)
    first, cache = decoder(tokens[:, :6], state=cache)
    rest, cache = decoder(tokens[:, 6:], state=cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), want_logits, **TOL)


def test_states_convert_between_the_layouts_exactly(retnet, tokens):
    _, state = retnet(tokens, mode="chunkwise")
    layers = unstack_state(state)
    assert len(layers) == CFG.n_layers and layers[1].kv_bhkv.shape == state.kv_bhkv.shape[1:]
    for got, want in zip(jax.tree.leaves(stack_state(layers)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)
    assert unstack_state(layers) is layers and stack_state(state) is state


def test_each_layout_refuses_the_others_state_naming_it(retnet, tokens):
    _, state = retnet(tokens[:, :3], mode="chunkwise")
    with pytest.raises(ValueError, match=r"state of a model with unstacked layers must be a list of 3 "
                                         r"per-layer RetentionStates"):
        unstack_blocks(retnet)(tokens, state=state)
    with pytest.raises(ValueError, match="state must be the RetentionState a RetNet call returned, got list"):
        retnet(tokens, state=unstack_state(state))
    bad = unstack_state(state)
    bad[2] = bad[2]._replace(position_b=bad[2].position_b + 1)
    with pytest.raises(ValueError, match=r"state\[i\]\.position_b must hold the same positions for every"):
        unstack_blocks(retnet)(tokens, state=bad)


def test_the_compiled_decode_loop_copies_no_weight_and_no_state():
    """Several one-token steps in one compiled loop, state donated: nothing the size of a weight matrix
    or of a layer's state is copied, sliced out of a stack, or concatenated (a scan over stacked layers
    slices each layer's weights and state out on every step)."""
    cfg = RetNetConfig(vocab_size=512, d_model=128, n_layers=3, n_heads=4, value_dim=256, ffn_dim=256)
    model = unstack_blocks(RetNet(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)

    def steps(params, state):
        def one(_, carry):
            token_b1, state = carry
            logits_b1v, state = nnx.merge(graphdef, params)(token_b1, mode="recurrent", state=state)
            return jnp.argmax(logits_b1v[:, 0], -1)[:, None].astype(jnp.int32), state
        return jax.lax.fori_loop(0, 4, one, (jnp.zeros((8, 1), jnp.int32), state))

    hlo = jax.jit(steps, donate_argnums=1).lower(params, model.init_state(8)).compile().as_text()
    smallest = min(min(x.size for x in jax.tree.leaves(params) if x.ndim >= 2),
                   model.init_state(8)[0].kv_bhkv.size)
    ops = r"(?:concatenate|copy|transpose|dynamic-slice|slice|dynamic-update-slice)"
    shapes = re.findall(rf"= \w+\[([\d,]*)\]\{{[\d,]*\}} {ops}\(", hlo)
    sizes = [int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes]
    assert max(sizes, default=0) < smallest, sizes
