"""The Transformer baseline: RetNet's size, call contract, cache and sharding names.

Oracle for caching: one parallel pass of the same model over the whole sequence. Tolerance float32:
1e-5 norm-wise relative on logits; a prefill into a cache then single-token steps measured 4e-7
(the softmax sums masked slots in another order), while a wrong position, mask or cache slot moves
the logits by > 1e-3. Causality is checked bit for bit: masked keys get exactly zero weight.

Model calls go through `jit_apply` (nnx.split + jax.jit), compiled once per shape and mode.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_relative_close, random_tokens
from flax import nnx

from retnet_jax import RetNet, RetNetConfig
from retnet_jax.baselines import KVCache, Transformer, TransformerBlock, TransformerConfig
from retnet_jax.baselines.config import FFN_MULTIPLE, parameter_count
from retnet_jax.losses import cross_entropy
from retnet_jax.ops import init_state
from retnet_jax.sharding import RULES

LENGTH, CAPACITY = 10, 12
TOL32 = 1e-5

# experiments/bench_retention.py's MODEL_CFG: the model whose training speed the README reports.
BENCHMARK = RetNetConfig(vocab_size=8192, d_model=512, n_layers=6, n_heads=4, value_dim=1024,
                         ffn_dim=1024, chunk_size=512)
# Every option the Transformer shares with RetNet, switched away from the tiny preset's choice.
VARIANT = dict(deepnorm=True, norm="layernorm", ffn="plain", activation="swish", tie_embeddings=True,
               embedding_norm=True, scale_embedding=True)


def jit_apply(model: Transformer):
    """`apply(tokens, mode=..., state=None, last_only=False)`, compiled once per mode and shape."""
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("mode", "last_only"))
    def apply(params, tokens, state, *, mode, last_only):
        return nnx.merge(graphdef, params)(tokens, mode=mode, state=state, last_only=last_only)

    def call(tokens, *, mode="parallel", state=None, last_only=False):
        return apply(params, jnp.asarray(tokens, jnp.int32), state, mode=mode, last_only=last_only)

    return call


@pytest.fixture(scope="module")
def tcfg(tiny_cfg) -> TransformerConfig:
    return TransformerConfig.from_retnet(tiny_cfg)


@pytest.fixture(scope="module")
def model(tcfg) -> Transformer:
    return Transformer(tcfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def apply(model):
    return jit_apply(model)


@pytest.fixture(scope="module")
def tokens(tcfg):
    return random_tokens(0, 2, LENGTH, tcfg.vocab_size)


def at_lengths(cache: KVCache, lengths) -> KVCache:
    """`cache` with its sequences moved to `lengths` (every layer alike)."""
    return cache._replace(length_b=jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), cache.length_b.shape))


def relative_size_gap(cfg: RetNetConfig, tcfg: TransformerConfig) -> float:
    retnet = parameter_count(RetNet, cfg)
    return abs(parameter_count(Transformer, tcfg) - retnet) / retnet


# ----------------------------------------------------------------------------------------------
# Built from a RetNet config, at the RetNet's size
# ----------------------------------------------------------------------------------------------


def test_config_copies_every_shared_field(tiny_cfg):
    """Given a RetNet config with every shared option changed, then the Transformer config carries
    the same value for every field both have, except the FFN width it matches."""
    cfg = tiny_cfg.replace(dtype=jnp.bfloat16, remat="full", dropout=0.1, **VARIANT)
    tcfg = TransformerConfig.from_retnet(cfg)
    for name in TransformerConfig.__dataclass_fields__:
        if hasattr(cfg, name) and name != "ffn_dim":
            assert getattr(tcfg, name) == getattr(cfg, name), name


@pytest.mark.parametrize("name", ["tiny", "benchmark", "1.3b"])
def test_parameter_count_matches_the_retnets(name):
    """Given the tiny preset, the benchmark model and the paper's 1.3B, then the matched Transformer
    has the RetNet's parameter count within 2% (the paper compares at equal size), an FFN width that
    is a multiple of 8, and `parameter_count` equal to the built model's (counted from shapes)."""
    cfg = BENCHMARK if name == "benchmark" else RetNetConfig.preset(name)
    tcfg = TransformerConfig.from_retnet(cfg)
    assert relative_size_gap(cfg, tcfg) <= 0.02
    assert tcfg.ffn_dim % FFN_MULTIPLE == 0
    assert tcfg.parameter_count == parameter_count(Transformer, tcfg)


def test_variant_parameter_count_matches_too(tiny_cfg):
    """Layernorm, plain FFN, tied and normalised embeddings and deepnorm change both models' sizes;
    the match and the closed-form count still hold."""
    cfg = tiny_cfg.replace(**VARIANT)
    tcfg = TransformerConfig.from_retnet(cfg)
    assert relative_size_gap(cfg, tcfg) <= 0.02
    assert tcfg.parameter_count == parameter_count(Transformer, tcfg)


def test_an_explicit_ffn_width_is_kept(tiny_cfg):
    assert TransformerConfig.from_retnet(tiny_cfg, ffn_dim=100).ffn_dim == 100


def test_every_parameter_carries_logical_axes(model):
    """Every parameter names each of its axes from the sharding rules' vocabulary; the stacked
    blocks' parameters start with "layers"; attention is split by head (Megatron)."""
    known = {name for name, _ in RULES}
    params = nnx.state(model, nnx.Param)
    for path, variable in jax.tree.leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        names = variable.get_metadata().get("logical_axes")
        where = jax.tree_util.keystr(path)
        assert names is not None and len(names) == variable.get_value().ndim, where
        assert set(names) <= known, where
        assert (names[0] == "layers") == ("blocks" in where), where
    attention = model.blocks.attention
    assert attention.qkv_proj.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    assert attention.out_proj.get_metadata()["logical_axes"] == ("layers", "heads", "head_dim", "embed")


# ----------------------------------------------------------------------------------------------
# Call contract and cache
# ----------------------------------------------------------------------------------------------


def test_logits_and_cache_shapes(tcfg, apply, tokens):
    """Given 2 x 10 tokens and no state, then logits are float32 `[B, T, vocab]` and the cache holds
    exactly those tokens: keys and values `[L, B, H, T, dh]`, lengths `[L, B]` at 10."""
    logits, cache = apply(tokens)
    chex.assert_shape(logits, (2, LENGTH, tcfg.vocab_size))
    assert logits.dtype == jnp.float32
    assert isinstance(cache, KVCache)
    chex.assert_shape([cache.key_bhck, cache.value_bhck],
                      (tcfg.n_layers, 2, tcfg.n_heads, LENGTH, tcfg.head_dim))
    chex.assert_trees_all_equal(cache.length_b, jnp.full((tcfg.n_layers, 2), LENGTH, jnp.int32))


@pytest.mark.parametrize("mode", ["chunkwise", "recurrent"])
def test_every_mode_is_the_parallel_computation(mode, model, tokens):
    """The modes "chunkwise" and "recurrent" are accepted for RetNet's contract and trace to the
    very program "parallel" does (a Transformer has one form)."""
    graphdef, params = nnx.split(model)

    def program(mode):
        return str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens, mode=mode))(params))

    assert program(mode) == program("parallel")


def test_last_only_gives_the_last_positions_logits(apply, tokens):
    """`last_only=True` returns `[B, 1, vocab]`, the last row of the full logits (float32, 1e-5)."""
    logits, cache = apply(tokens, last_only=True)
    reference, reference_cache = apply(tokens)
    assert_relative_close(logits, reference[:, -1:], TOL32)
    chex.assert_trees_all_equal(cache.length_b, reference_cache.length_b)


@pytest.mark.parametrize("variant", [False, True], ids=["tiny", "variant"])
def test_prefill_then_decoding_reproduces_the_parallel_logits(variant, tiny_cfg, tokens):
    """Given a cache of 12 slots, a 6-token prefill and 4 single-token steps, then every logit
    equals one parallel pass over the 10 tokens, the keys and values in the first 10 slots equal
    that pass's, and the lengths are 10 (float32, 1e-5). The variant switches every shared option
    (deepnorm, layernorm, plain FFN, swish, tied and normalised scaled embeddings)."""
    cfg = tiny_cfg.replace(**VARIANT) if variant else tiny_cfg
    model = Transformer(TransformerConfig.from_retnet(cfg), rngs=nnx.Rngs(0))
    apply = jit_apply(model)
    reference, reference_cache = apply(tokens)
    logits, cache = apply(tokens[:, :6], state=model.init_state(2, CAPACITY))
    assert_relative_close(logits, reference[:, :6], TOL32)
    for t in range(6, LENGTH):
        step_logits, cache = apply(tokens[:, t:t + 1], mode="recurrent", state=cache)
        assert_relative_close(step_logits, reference[:, t:t + 1], TOL32)
    assert_relative_close(cache.key_bhck[..., :LENGTH, :], reference_cache.key_bhck, TOL32)
    assert_relative_close(cache.value_bhck[..., :LENGTH, :], reference_cache.value_bhck, TOL32)
    chex.assert_trees_all_equal(cache.length_b, reference_cache.length_b)


def test_sequences_at_different_lengths_decode_in_one_batch(model, apply, tokens):
    """Given a batch prefilled with 6 tokens and sequence 0 rolled back to length 4 (its slots 4-5
    keep stale keys, which must never be read), when both continue one token at a time, then each
    row gives its own sequence's parallel logits: positions and masks are per sequence (float32,
    1e-5)."""
    lengths = (4, 6)
    reference, _ = apply(tokens)
    _, cache = apply(tokens[:, :6], state=model.init_state(2, CAPACITY))
    cache = at_lengths(cache, lengths)
    for step in range(3):
        positions = [n + step for n in lengths]
        next_tokens = jnp.stack([tokens[b, p] for b, p in enumerate(positions)])[:, None]
        logits, cache = apply(next_tokens, mode="recurrent", state=cache)
        for b, p in enumerate(positions):
            assert_relative_close(logits[b], reference[b, p:p + 1], TOL32)


@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "into-cache"])
@pytest.mark.parametrize("t", [0, 4, 8])
def test_logits_up_to_t_ignore_later_tokens(t, cached, model, apply, tokens, tcfg):
    """Given 10 tokens, when every token after t is changed, then the logits at positions <= t are
    bit-identical, attending among themselves or into a 12-slot cache."""
    shift = 1 + random_tokens(1, 2, LENGTH, tcfg.vocab_size - 1)  # never 0 mod vocab
    changed = jnp.where(jnp.arange(LENGTH) > t, (tokens + shift) % tcfg.vocab_size, tokens)
    state = model.init_state(2, CAPACITY) if cached else None
    logits, _ = apply(tokens, state=state)
    logits_changed, _ = apply(changed, state=state)
    chex.assert_trees_all_equal(logits_changed[:, :t + 1], logits[:, :t + 1])
    assert not np.array_equal(np.asarray(logits_changed[:, t + 1:]), np.asarray(logits[:, t + 1:]))


def test_bf16_model_caches_in_bf16_and_returns_float32_logits(tiny_cfg, tokens):
    """With `dtype=bfloat16`, keys and values are cached in bf16 (what the attention multiplies) and
    logits are float32 (shapes and dtypes only: nothing runs)."""
    model = nnx.eval_shape(lambda: Transformer(
        TransformerConfig.from_retnet(tiny_cfg.replace(dtype=jnp.bfloat16)), rngs=nnx.Rngs(0)))
    logits, cache = nnx.eval_shape(lambda m: m(tokens, state=m.init_state(2, CAPACITY)), model)
    assert cache.key_bhck.dtype == cache.value_bhck.dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32


def test_loss_is_differentiable_end_to_end(model, tokens):
    """`jax.grad` of the cross-entropy loss gives every parameter a finite, non-zero gradient, and
    it predicts the loss: a step of 3e-3 against the normalised gradient lowers the loss by
    3e-3 |g| to 1e-3 relative (central difference; measured 1.5e-5: float32 rounding of the loss,
    6e-8 x 6.2 per evaluation, over 2 x 3e-3, plus O(step^2) curvature). That the hand-written
    backward passes equal autodiff is tests/test_kernels.py's check."""
    graphdef, params = nnx.split(model)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    _, grads = value_and_grad(params)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))))
    step = 3e-3

    def moved(sign):
        return float(value_and_grad(jax.tree.map(lambda p, g: p + sign * step / norm * g, params, grads))[0])

    assert abs((moved(1) - moved(-1)) / (2 * step) - norm) <= 1e-3 * norm


def test_dropout_applies_only_with_a_key(tiny_cfg, apply, tokens):
    """With `dropout=0.1` in the RetNet config, the Transformer drops too, and only when a call
    passes `dropout_key`: no key gives exactly the logits of the same weights without dropout; a key
    gives other logits, the same ones for the same key."""
    model = Transformer(TransformerConfig.from_retnet(tiny_cfg.replace(dropout=0.1)), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    dropped = jax.jit(lambda params, key: nnx.merge(graphdef, params)(tokens, dropout_key=key)[0])
    first, again = dropped(params, jax.random.key(0)), dropped(params, jax.random.key(0))
    plain = jit_apply(model)(tokens)[0]
    chex.assert_trees_all_equal(plain, apply(tokens)[0])
    chex.assert_trees_all_equal(first, again)
    assert not np.allclose(first, plain)


# ----------------------------------------------------------------------------------------------
# A full cache and invalid ids are never silent
# ----------------------------------------------------------------------------------------------


def test_writing_past_the_capacity_is_refused(model, apply, tokens):
    """Eagerly, sequences at lengths 10 and 2 of a 12-slot cache cannot take 3 more tokens: the
    message names the capacity and the lengths. The cache of a call without state is full."""
    state = at_lengths(model.init_state(2, CAPACITY), [10, 2])
    with pytest.raises(ValueError, match=r"^KV cache full: capacity 12 slots, sequences at lengths \[10, 2"):
        model(jnp.zeros((2, 3), jnp.int32), state=state)
    _, cache = apply(tokens)
    with pytest.raises(ValueError, match=r"^KV cache full: capacity 10 slots"):
        model(jnp.zeros((2, 1), jnp.int32), mode="recurrent", state=cache)


def test_under_jit_overflowing_positions_are_nan(model, apply):
    """Traced, the lengths cannot be checked: sequence 0 (at 8 of 12 slots) given 6 tokens has NaN
    logits from its position 12 on and NaN keys, so its next call is NaN too, even rolled back;
    sequence 1 (at 2) is untouched."""
    state = at_lengths(model.init_state(2, CAPACITY), [8, 2])
    logits, cache = apply(jnp.ones((2, 6), jnp.int32), state=state)
    assert np.all(np.isfinite(logits[0, :4])) and np.all(np.isnan(logits[0, 4:]))
    assert np.all(np.isfinite(logits[1]))
    chex.assert_trees_all_equal(cache.length_b[0], jnp.asarray([14, 8], jnp.int32))
    logits, _ = apply(jnp.ones((2, 1), jnp.int32), state=at_lengths(cache, [5, 5]))
    assert np.all(np.isnan(logits[0])) and np.all(np.isfinite(logits[1]))


def test_under_jit_an_invalid_id_makes_the_rest_of_its_sequence_nan(apply, tokens, tcfg):
    """An id outside the vocabulary at position 3 of sequence 0, traced: its logits from position 3
    on are NaN, the earlier ones and the other sequence's unchanged."""
    logits, _ = apply(tokens.at[0, 3].set(tcfg.vocab_size))
    reference, _ = apply(tokens)
    chex.assert_trees_all_equal(logits[0, :3], reference[0, :3])
    chex.assert_trees_all_equal(logits[1], reference[1])
    assert np.all(np.isnan(logits[0, 3:]))


# ----------------------------------------------------------------------------------------------
# Bad input (eager calls: the checks run before any computation)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, message", [
    (jnp.zeros((4,), jnp.int32), r"^tokens must have shape \[B, T\]"),
    (jnp.zeros((1, 4), jnp.float32), r"^tokens must be integer ids"),
    (jnp.zeros((2, 0), jnp.int32), r"^tokens must hold at least one time step"),
    (jnp.full((1, 4), 256, jnp.int32), r"^tokens must lie in \[0, vocab_size\) = \[0, 256\)"),
], ids=["rank-1", "float", "empty", "out-of-vocabulary"])
def test_bad_tokens_are_rejected(tokens, message, model):
    with pytest.raises(ValueError, match=message):
        model(tokens)


@pytest.mark.parametrize("mode", ["Parallel", "chunked", "rnn", ""])
def test_unknown_mode_is_rejected(mode, model):
    with pytest.raises(ValueError, match=r"^mode must be one of"):
        model(jnp.zeros((1, 4), jnp.int32), mode=mode)


def test_state_of_another_kind_is_rejected(model):
    """A retention state, or the cache's fields as a plain tuple, name the KVCache expected."""
    for state in (init_state(1, 2, 32, 64), tuple(model.init_state(1, 4))):
        with pytest.raises(ValueError, match=r"^state must be the KVCache of init_state"):
            model(jnp.zeros((1, 1), jnp.int32), state=state)


def test_state_of_another_batch_size_is_rejected(model):
    """A cache for 3 sequences, continued with 2, names state.key_bhck and its layout."""
    with pytest.raises(ValueError, match=r"^state\.key_bhck must have shape \[L, B, H, C, dh\]"):
        model(jnp.zeros((2, 1), jnp.int32), state=model.init_state(3, 4))


def test_state_whose_layers_disagree_on_length_is_rejected(model):
    """The model reads each sequence's length once for all layers, so a cache whose layers are at
    different lengths (never one a call returns) is refused, naming state.length_b."""
    state = model.init_state(2, 4)
    state = state._replace(length_b=state.length_b.at[1, 0].set(3))
    with pytest.raises(ValueError, match=r"^state\.length_b must hold the same lengths for every layer"):
        model(jnp.zeros((2, 1), jnp.int32), state=state)


@pytest.mark.parametrize("capacity", [0, -1, 2.5, None])
def test_capacity_must_be_a_positive_int(capacity, model):
    with pytest.raises(ValueError, match=r"^capacity must be a positive int"):
        model.init_state(2, capacity)


def test_a_retnet_config_is_not_a_transformer_config(tiny_cfg):
    with pytest.raises(ValueError, match=r"^cfg must be a TransformerConfig .*from_retnet"):
        Transformer(tiny_cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=66, n_heads=4), r"^d_model=66 must be divisible by n_heads=4"),
    (dict(d_model=6, n_heads=2), r"^d_model // n_heads = 3 must be even"),
    (dict(ffn_dim=0), r"^ffn_dim must be a positive int"),
    (dict(dropout=1.0), r"^dropout must be a rate in \[0, 1\)"),
    (dict(ffn="nonsense"), r"^ffn must be one of \('glu', 'plain'\)"),
    (dict(kernels="cuda"), r"^kernels must be one of \('auto', 'xla_cpu', 'plain'\)"),
    (dict(dtype="float33"), r"^dtype must be a dtype"),
], ids=["heads", "odd-head", "ffn_dim", "dropout", "ffn", "kernels", "dtype"])
def test_bad_config_fields_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**changes)


def test_block_is_built_like_every_module(tcfg):
    """`TransformerBlock(cfg, rngs=...)` alone (what sharded initialisation builds) takes RetNetBlock's
    call: `block(x [B, T, d], block.init_state(B, C), mode=..., chunk_size=...)` gives `[B, T, d]` and
    a one-layer cache `[B, C, H, dh]` (shapes only: nothing runs)."""
    def run():
        block = TransformerBlock(tcfg, rngs=nnx.Rngs(0))
        return block(jnp.ones((2, 5, tcfg.d_model)), block.init_state(2, 8), mode="recurrent",
                     chunk_size=4)

    y, cache = nnx.eval_shape(run)
    chex.assert_shape(y, (2, 5, tcfg.d_model))
    chex.assert_shape([cache.key_bhck, cache.value_bhck], (2, tcfg.n_heads, 8, tcfg.head_dim))
    chex.assert_shape(cache.length_b, (2,))
