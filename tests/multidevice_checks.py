"""Measurements on 8 simulated CPU devices, printed as one JSON object (run by test_sharding.py).

Run alone: `python tests/multidevice_checks.py`. It must start before JAX initialises its backend,
which is why it is a separate process: it asks for 8 host devices first.
"""

from __future__ import annotations

import json
import math
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from retnet_jax import RetNet, RetNetBlock, RetNetConfig  # noqa: E402
from retnet_jax.losses import cross_entropy  # noqa: E402
from retnet_jax.sharding import init_sharded, logical_spec, make_mesh, variable_spec  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

MESHES = ((8, 1, 1), (2, 2, 2), (1, 2, 4))
BATCH, LENGTH = 8, 24
NORM_NAMES = ("norm", "norm_heads")


def configs(names):
    retnet = RetNetConfig.preset("tiny", n_heads=4, d_model=64, value_dim=128, ffn_dim=128,
                                 chunk_size=8, kernels=os.environ.get("KERNELS", "auto"))
    out = {"retnet": (RetNet, RetNetBlock, retnet)}
    if "transformer" in names:
        from retnet_jax.baselines import Transformer, TransformerBlock, TransformerConfig

        out["transformer"] = (Transformer, TransformerBlock, TransformerConfig.from_retnet(retnet))
    return {name: out[name] for name in names}


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_relative_error(a, b) -> float:
    return max(relative_error(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def modes_of(name):
    return ("parallel", "chunkwise", "recurrent")


def forward_and_grad(model, tokens, mode):
    graphdef, params = nnx.split(model)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], mode=mode)
        return cross_entropy(logits, tokens[:, 1:]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def check_model(name, model_cls, cfg, tokens) -> dict:
    reference = model_cls(cfg, rngs=nnx.Rngs(0))
    expected = {mode: forward_and_grad(reference, tokens, mode) for mode in modes_of(name)}
    ref_params = nnx.state(reference, nnx.Param)
    out = {}
    for shape in MESHES:
        mesh = make_mesh(*shape)
        model = init_sharded(model_cls, cfg, mesh)
        params = nnx.state(model, nnx.Param)
        flat = nnx.to_flat_state(params)
        specs_ok = all(v.get_value().sharding.spec == variable_spec(v) for _, v in flat)
        data_parallel = NamedSharding(mesh, logical_spec(("batch", "length")))
        with jax.set_mesh(mesh):
            sharded_tokens = jax.device_put(tokens, data_parallel)
            results = {mode: forward_and_grad(model, sharded_tokens, mode) for mode in modes_of(name)}
        fsdp, tensor = shape[1], shape[2]
        per_device = {}
        expected_bytes = 0.0
        unsplit = []
        for path, var in flat:
            value = var.get_value()
            names = var.get_metadata()["logical_axes"]
            split = math.prod(mesh.shape[a] for axes in value.sharding.spec if axes
                              for a in ((axes,) if isinstance(axes, str) else axes))
            is_norm = any(n in NORM_NAMES for n in names)
            if not is_norm and split != fsdp * tensor:
                unsplit.append(".".join(map(str, path)))
            expected_bytes += value.nbytes / split
            for shard in value.addressable_shards:
                per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
        out[str(shape)] = {
            "params_equal_unsharded": tree_relative_error(params, ref_params),
            "specs_follow_rules": specs_ok,
            "specs": {".".join(map(str, p)): str(v.get_value().sharding.spec) for p, v in flat},
            "logits": {m: relative_error(results[m][0], expected[m][0]) for m in results},
            "grads": {m: tree_relative_error(results[m][1], expected[m][1]) for m in results},
            "bytes_per_device": sorted(set(per_device.values())),
            "expected_bytes_per_device": expected_bytes,
            "total_bytes": sum(v.get_value().nbytes for _, v in flat),
            "params_not_split_fsdp_x_tensor": unsplit,
        }
    return out


def block_collectives(block_cls, cfg) -> dict:
    """All-reduce and all-gather counts in the compiled forward pass of one block, tensor = 4."""
    mesh = make_mesh(1, 1, 4, devices=jax.devices()[:4])
    block = init_sharded(block_cls, cfg, mesh)
    graphdef, params = nnx.split(block)
    x = jax.random.normal(jax.random.key(1), (2, LENGTH, cfg.d_model), jnp.float32)
    out = {}
    for mode in ("parallel", "chunkwise", "recurrent"):
        def forward(params, x):
            blk = nnx.merge(graphdef, params)
            return blk(x, blk.init_state(x.shape[0], LENGTH), mode=mode, chunk_size=8)[0]

        with jax.set_mesh(mesh):
            x_rep = jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
            hlo = jax.jit(forward).lower(params, x_rep).compile().as_text()
        out[mode] = {"all-reduce": hlo.count(" all-reduce("), "all-gather": hlo.count(" all-gather("),
                     "all-reduce-start": hlo.count(" all-reduce-start("),
                     "collective-permute": hlo.count(" collective-permute("),
                     "all-to-all": hlo.count(" all-to-all(")}
    return out


def main():
    assert jax.device_count() == 8, jax.devices()
    tokens = jax.random.randint(jax.random.key(0), (BATCH, LENGTH + 1), 0, 256)
    report = {}
    for name, (model_cls, block_cls, cfg) in configs(sys.argv[1:] or ["retnet", "transformer"]).items():
        report[name] = {"meshes": check_model(name, model_cls, cfg, tokens),
                        "block_collectives": block_collectives(block_cls, cfg)}
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
