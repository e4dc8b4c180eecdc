"""`RetNetConfig.kernels`: the XLA:CPU code paths and plain autodiff compute the same model.

Oracle: `kernels="plain"` (ordinary JAX autodiff of the formulas). In float64 the hand-written
backward passes of `kernels="xla_cpu"` must agree with it to 1e-10 (they differ only in summation
order: measured ~1e-15). With "plain" the model is differentiable in forward mode too.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import retnet_jax
from retnet_jax import RetNet, RetNetConfig
from retnet_jax.losses import cross_entropy
from retnet_jax.ops import kernels as kernels_module
from retnet_jax.ops.kernels import resolve_kernels

VARIANTS = {
    "default": {},
    "deepnorm": dict(deepnorm=True),
    "tied": dict(tie_embeddings=True),
    "layernorm-groupnorm": dict(norm="layernorm", head_norm="groupnorm", embedding_norm=True),
    "plain-ffn": dict(ffn="plain", activation="gelu"),
}


def loss_and_grads(cfg, tokens, mode, chunk_size=None):
    model = RetNet(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], mode=mode, chunk_size=chunk_size)
        return cross_entropy(logits, tokens[:, 1:])

    return jax.jit(jax.value_and_grad(loss))(params)


def worst_relative(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_xla_cpu_gradients_equal_autodiff_in_float64(variant, mode):
    with jax.enable_x64(True):
        tokens = jax.random.randint(jax.random.key(1), (2, 41), 0, 256)
        base = RetNetConfig.preset("tiny", dtype=jnp.float64, param_dtype=jnp.float64, chunk_size=16,
                                   **VARIANTS[variant])
        plain_loss, plain = loss_and_grads(base.replace(kernels="plain"), tokens, mode)
        cpu_loss, cpu = loss_and_grads(base.replace(kernels="xla_cpu"), tokens, mode)
        assert abs(float(cpu_loss - plain_loss)) <= 1e-12
        assert worst_relative(cpu, plain) <= 1e-10


def test_xla_cpu_grouped_chunkwise_gradients_equal_autodiff_in_float64(monkeypatch):
    """Chunk groups (an "xla_cpu" choice) lowered to 2 chunks of 4 so that 21 tokens take the scan
    over groups and a remainder."""
    monkeypatch.setattr(kernels_module, "GROUP_TOKENS", 8)
    with jax.enable_x64(True):
        tokens = jax.random.randint(jax.random.key(2), (2, 22), 0, 256)
        base = RetNetConfig.preset("tiny", dtype=jnp.float64, param_dtype=jnp.float64)
        _, plain = loss_and_grads(base.replace(kernels="plain"), tokens, "chunkwise", chunk_size=4)
        _, cpu = loss_and_grads(base.replace(kernels="xla_cpu"), tokens, "chunkwise", chunk_size=4)
        assert worst_relative(cpu, plain) <= 1e-10


def random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_plain_logits_have_a_forward_mode_derivative(mode):
    """`jax.jvp` of the logits works, and is the adjoint of `jax.vjp`: `<u, J v> = <J^T u, v>` for
    random u, v (float64; equal to rounding, ~1e-15 relative)."""
    with jax.enable_x64(True):
        cfg = RetNetConfig.preset("tiny", kernels="plain", dtype=jnp.float64, param_dtype=jnp.float64)
        graphdef, params = nnx.split(RetNet(cfg, rngs=nnx.Rngs(0)))
        tokens = jax.random.randint(jax.random.key(3), (2, 20), 0, 256)

        def logits(params):
            return nnx.merge(graphdef, params)(tokens, mode=mode)[0]

        v = random_like(params, 4)
        out, jv = jax.jit(lambda p, v: jax.jvp(logits, (p,), (v,)))(params, v)
        u = jax.random.normal(jax.random.key(5), out.shape, out.dtype)
        (jtu,) = jax.jit(lambda p, u: jax.vjp(logits, p)[1](u))(params, u)
        forward, reverse = vdot(u, jv), vdot(jtu, v)
        assert abs(float(forward - reverse)) <= 1e-10 * abs(float(reverse))


def test_plain_loss_has_a_hessian_vector_product():
    """Forward-over-reverse HVP equals reverse-over-reverse `grad(<grad(loss), v>)` (float64)."""
    with jax.enable_x64(True):
        cfg = RetNetConfig.preset("tiny", kernels="plain", dtype=jnp.float64, param_dtype=jnp.float64)
        graphdef, params = nnx.split(RetNet(cfg, rngs=nnx.Rngs(0)))
        tokens = jax.random.randint(jax.random.key(5), (2, 21), 0, 256)

        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], mode="chunkwise")
            return cross_entropy(logits, tokens[:, 1:])

        v = random_like(params, 6)
        _, hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,)))(params, v)
        expected = jax.jit(jax.grad(lambda p, v: vdot(jax.grad(loss)(p), v)))(params, v)
        assert worst_relative(hvp, expected) <= 1e-10


def test_auto_is_decided_when_the_model_is_built():
    model = RetNet(RetNetConfig.preset("tiny"), rngs=nnx.Rngs(0))
    assert model.cfg.kernels == "auto"
    assert model.kernels == resolve_kernels("auto") == ("xla_cpu" if jax.default_backend() == "cpu"
                                                        else "plain")
    assert model.blocks.retention.kernels == model.kernels


def test_an_unknown_kernels_choice_is_refused():
    with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'xla_cpu', 'plain'\), got 'cuda'"):
        RetNetConfig.preset("tiny", kernels="cuda")


def test_only_the_kernels_module_reads_the_backend():
    """No `jax.default_backend()` in traced library code: one place decides."""
    root = Path(retnet_jax.__file__).parent
    readers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if re.search(r"default_backend\(", p.read_text()))
    assert readers == ["ops/kernels.py"]


@pytest.mark.parametrize("kernels", ["xla_cpu", "plain"])
def test_a_decode_step_reads_each_weight_as_stored(kernels):
    """The compiled one-token step concatenates, copies or transposes nothing the size of a weight
    matrix: the fused kernels are contracted as they are stored, once per step."""
    cfg = RetNetConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, value_dim=256, ffn_dim=256,
                       kernels=kernels)
    model = RetNet(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, mode="recurrent", state=s))
    hlo = step.lower(params, jnp.zeros((1, 1), jnp.int32), model.init_state(1)).compile().as_text()
    smallest_weight = min(x[0].size for x in jax.tree.leaves(params) if x.ndim >= 3)  # per layer
    shapes = re.findall(r"= \w+\[([\d,]*)\]\{[\d,]*\} (?:concatenate|copy|transpose)\(", hlo)
    sizes = [int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes]
    assert max(sizes, default=0) < smallest_weight, sizes
