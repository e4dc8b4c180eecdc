"""The retention forms compute one function (SPEC section 3).

`parallel_retention`, `chunkwise_retention`, `recurrent_retention` and a loop of `retention_step`
must give the same outputs and the same `RetentionState`, from position 0 or from any state, and
match an oracle written straight from SPEC section 3 (`conftest.oracle_parallel_retention`).

Tolerances (norm-wise relative error, see conftest):
- float64: 1e-10. The forms differ only in summation order; measured ~1e-15 (a few ulps of 2**-52).
- float32: 1e-5. Measured ~3e-7 (a few ulps of 2**-23 accumulated over <= 30 terms); 1e-5 leaves
  room for other CPUs / BLAS orderings; a wrong decay exponent or position moves results by far
  more (each such mutation of the library was seen to fail these tests).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (
    FORMS,
    assert_relative_close,
    assert_states_close,
    concat_states,
    oracle_parallel_retention,
    oracle_state,
    precision,
    random_qkv,
    relative_error,
    run_form,
    to_f64,
)
from retnet_jax.ops import init_state, official_log_decay

HEADS, KEY_DIM, VALUE_DIM = 3, 4, 6  # dk != dv so a transposed state cannot pass
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}
DTYPES = [pytest.param(jnp.float64, id="float64"), pytest.param(jnp.float32, id="float32")]


@dataclasses.dataclass(frozen=True)
class Case:
    """`prefix[b]` tokens of row b are consumed first (building a state), then `length` more."""

    batch: int
    length: int
    chunk: int
    prefix: tuple[int, ...] = ()

    def prefixes(self):
        return self.prefix or (0,) * self.batch


# Block shapes are shared between cases on purpose: every (shape, dtype) costs a compilation.
CASES = [
    pytest.param(Case(batch=1, length=1, chunk=4), id="B=1-T=1"),
    pytest.param(Case(batch=2, length=13, chunk=4), id="B=2-T=13-not-multiple-of-C=4"),
    pytest.param(Case(batch=2, length=6, chunk=16), id="C=16>=T=6"),
    pytest.param(Case(batch=2, length=6, chunk=4, prefix=(7, 7)), id="from-state-at-7"),
    pytest.param(Case(batch=2, length=6, chunk=4, prefix=(3, 9)), id="rows-at-positions-3-and-9"),
]


def log_decay_h():
    return jnp.asarray(official_log_decay(HEADS))


def gamma_h() -> np.ndarray:
    """The decays the library actually uses: exp of its (float32) log-decays, in float64."""
    return np.exp(to_f64(official_log_decay(HEADS)))


def make_case(case: Case, dtype, q_scale: float = 1.0):
    """Block inputs `[B, T]`, the state the prefixes leave (None if no prefix), and each row's full
    sequence (prefix + block) for the oracle."""
    rows = [random_qkv(10 * b + case.length, 1, p + case.length, HEADS, KEY_DIM, VALUE_DIM, dtype,
                       q_scale=q_scale)
            for b, p in enumerate(case.prefixes())]
    block = tuple(jnp.concatenate([row[i][:, p:] for row, p in zip(rows, case.prefixes())])
                  for i in range(3))
    state = None
    if case.prefix:
        state = concat_states([run_form("step", *(x[:, :p] for x in row), log_decay_h())[1]
                               for row, p in zip(rows, case.prefixes())])
    return block, state, rows


def oracle_outputs(case: Case, rows) -> np.ndarray:
    """The oracle over each row's whole sequence, keeping the block's last `length` rows."""
    return np.concatenate([oracle_parallel_retention(*row, gamma_h())[0][:, -case.length:]
                           for row in rows])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS)
def test_form_matches_spec_oracle(form, case, dtype):
    """Given random q~, k~, v (and possibly a state from a prefix), when a form runs the block,
    then its output equals the float64 numpy oracle of SPEC section 3 (explicit D~, clamp) run over
    prefix + block."""
    with precision(dtype):
        (q, k, v), state, rows = make_case(case, dtype)
        out, _ = run_form(form, q, k, v, log_decay_h(), state, chunk_size=case.chunk)
        chex.assert_shape(out, (case.batch, case.length, HEADS, VALUE_DIM))
        assert_relative_close(out, oracle_outputs(case, rows), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", ["chunkwise", "recurrent", "step"])
def test_form_agrees_with_parallel_form(form, case, dtype):
    """Given the same inputs and state, when a form and the parallel form run, then outputs agree."""
    with precision(dtype):
        (q, k, v), state, _ = make_case(case, dtype)
        out, _ = run_form(form, q, k, v, log_decay_h(), state, chunk_size=case.chunk)
        reference, _ = run_form("parallel", q, k, v, log_decay_h(), state)
        assert_relative_close(out, reference, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS)
def test_returned_state_is_the_documented_decayed_sums(form, case, dtype):
    """Given a block (after an optional prefix), when a form runs it, then the returned state is
    `RetentionState`'s documented content for the whole row: `sum gamma**(n-m) k~_m^T v_m`,
    `sum gamma**(n-m) k~_m` (oracle: float64 numpy) and position = prefix + T per row."""
    with precision(dtype):
        (q, k, v), state, rows = make_case(case, dtype)
        _, new_state = run_form(form, q, k, v, log_decay_h(), state, chunk_size=case.chunk)
        sums = [oracle_state(row[1], row[2], gamma_h()) for row in rows]
        assert_relative_close(new_state.kv_bhkv, np.concatenate([s[0] for s in sums]), TOL[dtype])
        assert_relative_close(new_state.key_bhk, np.concatenate([s[1] for s in sums]), TOL[dtype])
        expected_positions = np.asarray(case.prefixes()) + case.length
        chex.assert_trees_all_equal(new_state.position_b, jnp.asarray(expected_positions, jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefill", ["parallel", "chunkwise"])
def test_prefill_hands_decoding_the_token_by_token_state(prefill, dtype):
    """Given a prompt of 11 tokens, when it is prefilled by the parallel or chunkwise form, then the
    state equals the one `retention_step` builds token by token, and decoding 5 more tokens from it
    gives the outputs of token-by-token decoding of the whole sequence (oracle: the step loop)."""
    with precision(dtype):
        q, k, v = random_qkv(3, 2, 16, HEADS, KEY_DIM, VALUE_DIM, dtype)
        prompt, rest = (tuple(x[:, :11] for x in (q, k, v)), tuple(x[:, 11:] for x in (q, k, v)))
        _, prefilled = run_form(prefill, *prompt, log_decay_h(), chunk_size=4)
        _, stepped = run_form("step", *prompt, log_decay_h())
        assert_states_close(prefilled, stepped, TOL[dtype])

        decoded, _ = run_form("step", *rest, log_decay_h(), prefilled)
        reference, _ = run_form("step", q, k, v, log_decay_h())
        assert_relative_close(decoded, reference[:, 11:], TOL[dtype])


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_chunkwise_output_does_not_depend_on_chunk_size(chunk):
    """Given T=12 tokens, when the chunkwise form runs with any chunk size (dividing T or not, 1,
    or larger than T), then it gives the parallel form's output (float32, tolerance as above)."""
    q, k, v = random_qkv(5, 2, 12, HEADS, KEY_DIM, VALUE_DIM)
    out, state = run_form("chunkwise", q, k, v, log_decay_h(), chunk_size=chunk)
    reference, reference_state = run_form("parallel", q, k, v, log_decay_h())
    assert_relative_close(out, reference, TOL[jnp.float32])
    assert_states_close(state, reference_state, TOL[jnp.float32])


def test_clamp_divides_rows_whose_sum_exceeds_one():
    """Given q scaled up so that many rows have |sum_m A[n, m]| > 1, when the parallel form runs,
    then it matches the oracle *with* the SPEC clamp and not the oracle without it (float64)."""
    with precision(jnp.float64):
        q, k, v = random_qkv(7, 2, 6, HEADS, KEY_DIM, VALUE_DIM, jnp.float64, q_scale=10.0)
        out, _ = run_form("parallel", q, k, v, log_decay_h())
        clamped, row_sum = oracle_parallel_retention(q, k, v, gamma_h())
        unclamped = clamped * np.maximum(np.abs(row_sum), 1.0)[..., None]
        assert (np.abs(row_sum) > 1).mean() > 0.3 and (np.abs(row_sum) < 1).any(), "inputs too tame"
        assert_relative_close(out, clamped, 1e-10)  # float64, see module docstring
        assert relative_error(out, unclamped) > 0.1


def test_recurrent_form_matches_spec_recurrence_where_clamp_is_inactive():
    """Given q small enough that no row sum reaches 1 (the clamp does nothing), when the recurrent
    form runs, then it equals SPEC's literal official recurrence in float64:
    `s_n = gamma s_{n-1} + 1`, `S_n = S_{n-1} gamma sqrt(s_{n-1}/s_n) + k~_n^T v_n / sqrt(s_n)`,
    `o_n = q~_n S_n` (which the official code runs without the clamp)."""
    with precision(jnp.float64):
        q, k, v = random_qkv(8, 2, 6, HEADS, KEY_DIM, VALUE_DIM, jnp.float64, q_scale=0.1)
        out, _ = run_form("recurrent", q, k, v, log_decay_h())

        qn, kn, vn, gamma = to_f64(q), to_f64(k), to_f64(v), gamma_h()
        expected = np.zeros(vn.shape)
        for h in range(HEADS):
            g = gamma[h]
            for b in range(qn.shape[0]):
                s_prev, big_s = None, None
                for n in range(qn.shape[1]):
                    s = 1.0 if s_prev is None else g * s_prev + 1.0
                    kv = np.outer(kn[b, n, h], vn[b, n, h])
                    big_s = (kv if big_s is None
                             else big_s * g * np.sqrt(s_prev / s) + kv / np.sqrt(s))
                    expected[b, n, h] = qn[b, n, h] @ big_s
                    s_prev = s
        _, row_sum = oracle_parallel_retention(q, k, v, gamma)
        assert np.abs(row_sum).max() < 1.0, "the clamp must be inactive for this comparison"
        assert_relative_close(out, expected, 1e-10)  # float64, see module docstring


@pytest.mark.parametrize("form", FORMS)
def test_head_without_decay_matches_oracle(form):
    """Given heads with gamma = 1 exactly (log gamma = 0: plain causal averaging) beside decaying
    ones, when a form runs (from a state at position 7), then it matches the SPEC oracle with
    `D[n, m] = 1` for m <= n (float64, 1e-10 as above)."""
    with precision(jnp.float64):
        log_decay_h = jnp.asarray([0.0, -0.05, 0.0], jnp.float64)
        q, k, v = random_qkv(9, 2, 13, HEADS, KEY_DIM, VALUE_DIM, jnp.float64)
        _, state = run_form(form, q[:, :7], k[:, :7], v[:, :7], log_decay_h, chunk_size=4)
        out, _ = run_form(form, q[:, 7:], k[:, 7:], v[:, 7:], log_decay_h, state, chunk_size=4)
        expected, _ = oracle_parallel_retention(q, k, v, np.exp(to_f64(log_decay_h)))
        assert_relative_close(out, expected[:, 7:], 1e-10)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]])
def test_parallel_and_chunkwise_gradients_agree(case):
    """Given a random cotangent w, when d/d(q, k, v) of sum(o * w) is taken through the parallel and
    the chunkwise form, then the gradients agree to 1e-8 relative in float64 (the clamp's
    denominator is a stop-gradient in both; measured ~1e-15)."""
    with precision(jnp.float64):
        (q, k, v), state, _ = make_case(case, jnp.float64)
        w = jnp.asarray(np.random.default_rng(0).standard_normal(v.shape))

        def loss(form):
            return lambda q, k, v: jnp.sum(
                run_form(form, q, k, v, log_decay_h(), state, chunk_size=case.chunk)[0] * w)

        grads_parallel = jax.jit(jax.grad(loss("parallel"), argnums=(0, 1, 2)))(q, k, v)
        grads_chunkwise = jax.jit(jax.grad(loss("chunkwise"), argnums=(0, 1, 2)))(q, k, v)
        for g_c, g_p in zip(grads_chunkwise, grads_parallel):
            assert_relative_close(g_c, g_p, 1e-8)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float64],
                         ids=["bfloat16", "float32", "float64"])
def test_output_keeps_v_dtype_and_state_accumulates_in_at_least_float32(form, dtype):
    """Given inputs of `dtype`, when a form runs, then o has v's dtype and the state sums are
    float32 (float64 for float64 inputs), positions int32 (SPEC section 8: accumulate in float32)."""
    with precision(dtype):
        q, k, v = random_qkv(1, 2, 6, HEADS, KEY_DIM, VALUE_DIM, dtype)
        out, state = run_form(form, q, k, v, log_decay_h(), chunk_size=4)
        accumulate = jnp.float64 if dtype == jnp.float64 else jnp.float32
        chex.assert_type(out, dtype)
        chex.assert_type([state.kv_bhkv, state.key_bhk], accumulate)
        chex.assert_type(state.position_b, jnp.int32)
        chex.assert_shape([state.kv_bhkv, state.key_bhk, state.position_b],
                          [(2, HEADS, KEY_DIM, VALUE_DIM), (2, HEADS, KEY_DIM), (2,)])


def test_empty_state_equals_no_state():
    """Given `init_state(...)` (nothing retained, position 0), when a form continues from it, then
    the result equals passing `state=None`: position counts exactly, values to 1e-6 (float32).

    The state's terms are exact zeros, so only the compiler's summation order can differ between the
    two programs: bit-identical on XLA:CPU, one float32 ulp apart (2.4e-7) on an H200."""
    q, k, v = random_qkv(2, 2, 6, HEADS, KEY_DIM, VALUE_DIM)
    empty = init_state(2, HEADS, KEY_DIM, VALUE_DIM)
    out_empty, state_empty = run_form("parallel", q, k, v, log_decay_h(), empty)
    out_none, state_none = run_form("parallel", q, k, v, log_decay_h())
    assert_relative_close(out_empty, out_none, 1e-6)
    assert_states_close(state_empty, state_none, 1e-6)


@pytest.mark.parametrize("length", [13, 20, 24])
def test_chunkwise_in_groups_of_chunks_is_the_same_function(monkeypatch, length):
    """Given groups of 2 chunks of 3 tokens (`kernels="xla_cpu"`, with `GROUP_TOKENS` lowered from
    2048 so small inputs take the grouped path: a scan over whole groups, then the remainder, if any),
    when the chunkwise form continues from a state (rows at positions 3 and 9), then outputs, state
    and the gradients of sum(o * w) equal the parallel form's (float64, 1e-10 and 1e-8 as above)."""
    from retnet_jax.ops import chunkwise_retention, kernels

    monkeypatch.setattr(kernels, "GROUP_TOKENS", 7)  # -> groups of 2 * 3 = 6 tokens
    with precision(jnp.float64):
        q, k, v = random_qkv(11, 2, length, HEADS, KEY_DIM, VALUE_DIM, jnp.float64)
        pq, pk, pv = random_qkv(12, 2, 9, HEADS, KEY_DIM, VALUE_DIM, jnp.float64)
        state = concat_states([run_form("parallel", pq[i:i + 1, :n], pk[i:i + 1, :n], pv[i:i + 1, :n],
                                        log_decay_h())[1] for i, n in enumerate((3, 9))])
        w = jnp.asarray(np.random.default_rng(1).standard_normal(v.shape))
        grouped = jax.jit(lambda q, k, v: chunkwise_retention(
            q, k, v, log_decay_h(), state, chunk_size=3, kernels="xla_cpu"))
        out, new_state = grouped(q, k, v)
        reference, reference_state = run_form("parallel", q, k, v, log_decay_h(), state)
        assert_relative_close(out, reference, TOL[jnp.float64])
        assert_states_close(new_state, reference_state, TOL[jnp.float64])

        def loss(fn):
            return lambda q, k, v: jnp.sum(fn(q, k, v)[0] * w)

        grads = jax.grad(loss(grouped), argnums=(0, 1, 2))(q, k, v)
        reference_grads = jax.grad(loss(lambda q, k, v: run_form(
            "parallel", q, k, v, log_decay_h(), state)), argnums=(0, 1, 2))(q, k, v)
        for g, g_ref in zip(grads, reference_grads):
            assert_relative_close(g, g_ref, 1e-8)


# ----------------------------------------------------------------------------------------------
# Kernel choices (retnet_jax/ops/kernels.py)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
@pytest.mark.parametrize("form", ["parallel", "chunkwise"])
def test_xla_cpu_kernels_give_the_plain_outputs_states_and_gradients(form, case):
    """Given the same inputs and state, when a form runs with `kernels="xla_cpu"` (hand-written
    backward passes) and with `kernels="plain"` (autodiff, the oracle), then outputs, returned
    states and the gradients of a random linear function of both w.r.t. q, k, v and the incoming
    state's sums agree (float64, 1e-10 as above: only summation orders differ)."""
    dtype = jnp.float64
    with precision(dtype):
        (q, k, v), state, _ = make_case(case, dtype)
        state = init_state(case.batch, HEADS, KEY_DIM, VALUE_DIM) if state is None else state
        rng = np.random.default_rng(0)
        w_out, w_kv, w_key = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in (
            v.shape, state.kv_bhkv.shape, state.key_bhk.shape))

        def run(kernels):
            def fn(q, k, v, kv, key):
                out, new = run_form(form, q, k, v, log_decay_h(), state._replace(kv_bhkv=kv, key_bhk=key),
                                    chunk_size=case.chunk, kernels=kernels)
                return jnp.sum(out * w_out) + jnp.sum(new.kv_bhkv * w_kv) + jnp.sum(new.key_bhk * w_key)
            return fn

        primals = (q, k, v, state.kv_bhkv, state.key_bhk)
        (out, new_state), (reference, reference_state) = (
            run_form(form, q, k, v, log_decay_h(), state, chunk_size=case.chunk, kernels=kernels)
            for kernels in ("xla_cpu", "plain"))
        assert_relative_close(out, reference, TOL[dtype])
        assert_states_close(new_state, reference_state, TOL[dtype])
        grads = jax.jit(jax.grad(run("xla_cpu"), argnums=range(5)))(*primals)
        reference_grads = jax.jit(jax.grad(run("plain"), argnums=range(5)))(*primals)
        for g, g_ref in zip(grads, reference_grads):
            assert_relative_close(g, g_ref, TOL[dtype])


def _directional_derivatives(form, kernels):
    """`jax.jvp` of sum(o * w) along a random direction, and the same derivative by `jax.grad`."""
    q, k, v = random_qkv(4, 1, 8, HEADS, KEY_DIM, VALUE_DIM)
    direction = random_qkv(5, 1, 8, HEADS, KEY_DIM, VALUE_DIM)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(v.shape), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(run_form(form, q, k, v, log_decay_h(), kernels=kernels)[0] * w)

    _, forward = jax.jvp(loss, (q, k, v), direction)
    reverse = sum(jnp.vdot(g, d) for g, d in zip(jax.grad(loss, argnums=(0, 1, 2))(q, k, v), direction))
    return forward, reverse


@pytest.mark.parametrize("form", FORMS)
def test_forward_mode_differentiates_every_form_with_plain_kernels(form):
    """Given `kernels="plain"` (what the recurrent form and the step always are), then `jax.jvp`
    works and gives the directional derivative `jax.grad` gives (float32, 1e-5 relative)."""
    forward, reverse = _directional_derivatives(form, "plain")
    np.testing.assert_allclose(forward, reverse, rtol=1e-5)


@pytest.mark.parametrize("form", ["parallel", "chunkwise"])
def test_xla_cpu_kernels_refuse_forward_mode_with_a_clear_error(form):
    """Hand-written backward passes (`jax.custom_vjp`) are reverse mode only: JAX says so."""
    with pytest.raises(TypeError, match="forward-mode"):
        _directional_derivatives(form, "xla_cpu")
