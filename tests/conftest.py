"""Shared test helpers: random inputs, the SPEC-literal retention oracle, precision switches.

Conventions used by every test file:
- "relative error" is norm-wise: `max|actual - expected| / max|expected|` over the whole array, so
  rows that happen to be near zero do not turn float rounding into a spurious failure.
- float64 runs happen inside `jax.enable_x64(True)` (a context manager in jax 0.10), entered by the
  `precision` helper; an autouse fixture checks that x64 never leaks out of a test.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retnet_jax import RetNet, RetNetConfig
from retnet_jax.ops import (
    RetentionState,
    chunkwise_retention,
    parallel_retention,
    recurrent_retention,
    retention_step,
)

FORMS = ("parallel", "chunkwise", "recurrent", "step")

# The suite checks the maths to float32 rounding (1e-5 relative), so float32 matmuls must be float32.
# XLA:CPU always computes them so; on a GPU, JAX's default precision runs them as TF32 (measured on an
# H200, jax 0.11.2: 3e-4 relative error on a 512x512 product, and 27 of this suite's tolerance checks
# fail), and on a TPU as bf16 passes. "highest" asks every backend for full float32.
jax.config.update("jax_default_matmul_precision", "highest")


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _x64_does_not_leak():
    """Every test starts and ends with 64-bit types disabled (the JAX default)."""
    assert not jax.config.jax_enable_x64, "a previous test leaked jax_enable_x64"
    yield
    assert not jax.config.jax_enable_x64, "this test leaked jax_enable_x64"


def precision(dtype):
    """Context in which arrays of `dtype` exist: x64 on for float64, untouched otherwise."""
    if np.dtype(dtype) == np.float64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------


def to_f64(x) -> np.ndarray:
    """Any array (jax or numpy, bf16 included) as float64 numpy, exactly."""
    return np.asarray(x).astype(np.float64)


def relative_error(actual, expected) -> float:
    """`max|actual - expected| / max|expected|` (norm-wise relative error), in float64."""
    actual, expected = to_f64(actual), to_f64(expected)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), np.finfo(float).tiny))


def assert_relative_close(actual, expected, tol: float):
    """chex closeness with `atol = tol * max|expected|`, i.e. norm-wise relative error <= tol."""
    chex.assert_equal_shape([actual, expected])
    expected64 = to_f64(expected)
    scale = max(np.abs(expected64).max(), np.finfo(float).tiny)
    chex.assert_trees_all_close(to_f64(actual), expected64, rtol=0.0, atol=tol * scale)


def assert_states_close(actual: RetentionState, expected: RetentionState, tol: float):
    """Sums to `tol` relative; the position count exactly."""
    assert_relative_close(actual.kv_bhkv, expected.kv_bhkv, tol)
    assert_relative_close(actual.key_bhk, expected.key_bhk, tol)
    chex.assert_trees_all_equal(actual.position_b, expected.position_b)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def random_qkv(seed: int, batch: int, length: int, heads: int, key_dim: int, value_dim: int,
               dtype=jnp.float32, q_scale: float = 1.0):
    """q, k `[B, T, H, dk]`, v `[B, T, H, dv]` as the model feeds them (k scaled by dk**-0.5).

    Drawn in float64 numpy and rounded once to `dtype`, so an oracle can be fed exactly the values
    the library saw (`to_f64` of the returned arrays). Call under `precision(dtype)` for float64.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, key_dim)) * q_scale
    k = rng.standard_normal((batch, length, heads, key_dim)) * key_dim**-0.5
    v = rng.standard_normal((batch, length, heads, value_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# Jitted once per shape and dtype (eager einsums recompile per call and are ~5x slower to test).
_JITTED = {
    "parallel": jax.jit(parallel_retention, static_argnames="kernels"),
    "chunkwise": jax.jit(chunkwise_retention, static_argnames=("chunk_size", "kernels")),
    "recurrent": jax.jit(recurrent_retention),
    "step": jax.jit(retention_step),
}


def run_form(form: str, q, k, v, log_decay_h, state=None, *, chunk_size: int = 4,
             kernels: str = "plain"):
    """Run one retention form by name (jitted); "step" loops `retention_step` over time. `kernels`
    applies to the parallel and chunkwise forms (the others have one code path)."""
    if form == "chunkwise":
        return _JITTED[form](q, k, v, log_decay_h, state, chunk_size=chunk_size, kernels=kernels)
    if form == "parallel":
        return _JITTED[form](q, k, v, log_decay_h, state, kernels=kernels)
    if form == "recurrent":
        return _JITTED[form](q, k, v, log_decay_h, state)
    if form == "step":
        outs = []
        for t in range(q.shape[1]):
            o, state = _JITTED[form](q[:, t], k[:, t], v[:, t], log_decay_h, state)
            outs.append(o)
        return jnp.stack(outs, axis=1), state
    raise ValueError(form)


def concat_states(states) -> RetentionState:
    """Stack single-sequence states along the batch axis (sequences at different positions)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *states)


# ----------------------------------------------------------------------------------------------
# The oracle: SPEC section 3, literally, in float64 numpy
# ----------------------------------------------------------------------------------------------


def oracle_parallel_retention(q, k, v, gamma_h) -> tuple[np.ndarray, np.ndarray]:
    """SPEC section 3, parallel form, for whole sequences starting at position 0.

    `D[n, m] = gamma**(n - m)` (m <= n, else 0); `D~[n, :] = D[n, :] / sqrt(sum_m D[n, m])`;
    `A = (q k^T) * D~`; each row of A divided by `max(|sum_m A[n, m]|, 1)`; `o = A v`.
    Inputs `[B, T, H, *]` (already rotated, k already scaled), `gamma_h` `[H]`; all float64.
    Returns `(o [B, T, H, dv], row_sum [B, T, H])`, the row sum before the clamp for tests that
    need to know which rows were clamped.
    """
    q, k, v, gamma_h = (to_f64(x) for x in (q, k, v, gamma_h))
    batch, length, heads, _ = q.shape
    n = np.arange(length)
    out = np.zeros(v.shape)
    row_sums = np.zeros((batch, length, heads))
    for h in range(heads):
        with np.errstate(over="ignore"):
            decay = np.where(n[:, None] >= n[None, :],
                             gamma_h[h] ** (n[:, None] - n[None, :]).astype(np.float64), 0.0)
        decay_tilde = decay / np.sqrt(decay.sum(axis=1, keepdims=True))
        for b in range(batch):
            a = (q[b, :, h] @ k[b, :, h].T) * decay_tilde
            row_sum = a.sum(axis=1)
            row_sums[b, :, h] = row_sum
            out[b, :, h] = (a / np.maximum(np.abs(row_sum), 1.0)[:, None]) @ v[b, :, h]
    return out, row_sums


def oracle_state(k, v, gamma_h) -> tuple[np.ndarray, np.ndarray]:
    """`RetentionState`'s documented content after T tokens: the un-normalised decayed sums
    `sum_m gamma**(T-1-m) k_m^T v_m` `[B, H, dk, dv]` and `sum_m gamma**(T-1-m) k_m` `[B, H, dk]`."""
    k, v, gamma_h = (to_f64(x) for x in (k, v, gamma_h))
    length = k.shape[1]
    weight_th = gamma_h[None, :] ** (length - 1 - np.arange(length))[:, None]
    kv = np.einsum("th,bthk,bthv->bhkv", weight_th, k, v)
    key = np.einsum("th,bthk->bhk", weight_th, k)
    return kv, key


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def jit_model(model: RetNet):
    """`apply(tokens, mode=..., state=None, chunk_size=None)` compiled once per mode and shape.

    Uses the documented pattern `graphdef, state = nnx.split(model)` + `nnx.merge` under `jax.jit`;
    eager model calls retrace the layer scan every time, which is far slower in a test suite.
    """
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("mode", "chunk_size"))
    def apply(params, tokens, state, *, mode, chunk_size):
        return nnx.merge(graphdef, params)(tokens, mode=mode, state=state, chunk_size=chunk_size)

    def call(tokens, *, mode, state=None, chunk_size=None):
        tokens = jnp.asarray(tokens, jnp.int32)
        state = model.init_state(tokens.shape[0]) if state is None else state
        return apply(params, tokens, state, mode=mode, chunk_size=chunk_size)

    return call


def random_tokens(seed: int, batch: int, length: int, vocab_size: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab_size, (batch, length)), jnp.int32)


@pytest.fixture(scope="session")
def tiny_cfg() -> RetNetConfig:
    return RetNetConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> RetNet:
    return RetNet(tiny_cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def tiny_apply(tiny_model):
    return jit_model(tiny_model)


@pytest.fixture(scope="session")
def tiny_bf16_model(tiny_cfg) -> RetNet:
    """The tiny preset computing in bf16 (parameters stay float32)."""
    return RetNet(tiny_cfg.replace(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def tiny_bf16_apply(tiny_bf16_model):
    return jit_model(tiny_bf16_model)


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def experiment_script(name: str, results_dir: Path, monkeypatch):
    """`experiments/<name>.py` imported as a module with its `RESULTS` folder moved to `results_dir`:
    the committed results are out of reach whatever the script writes."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", results_dir)
    return module
