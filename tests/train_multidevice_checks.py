"""Three train steps on 1 device and on 8 simulated CPU devices, printed as one JSON object (run by
test_train_multidevice.py; JAX must be told about the devices before it starts, hence a process).

Run alone: `python tests/train_multidevice_checks.py [retnet] [transformer]`.
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from retnet_jax.sharding import make_mesh, variable_spec  # noqa: E402
from retnet_jax.train import MeshShape, TrainConfig, distributed  # noqa: E402
from retnet_jax.train.load import model_class  # noqa: E402
from retnet_jax.train.mesh import run_mesh  # noqa: E402
from retnet_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from retnet_jax.train.state import (  # noqa: E402
    abstract_model,
    init_params,
    init_train_state,
    train_state_shardings,
)
from retnet_jax.train.step import batch_sharding, make_train_step  # noqa: E402

MESHES = {"1 device": None, "(2, 2, 2)": MeshShape(2, 2, 2), "(1, 2, 4)": MeshShape(1, 2, 4)}
STEPS, BATCH, LENGTH, VOCAB = 3, 8, 16, 257


def config(family: str, mesh: MeshShape | None) -> TrainConfig:
    return TrainConfig(family=family, preset="tiny", model={"n_heads": 4}, batch_size=BATCH,
                       seq_len=LENGTH, steps=10, warmup_steps=0, learning_rate=1e-3,
                       mesh=mesh or MeshShape())


def batches() -> list[dict[str, np.ndarray]]:
    tokens = np.random.default_rng(0).integers(0, VOCAB, (STEPS, BATCH, LENGTH + 1)).astype(np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def run(family: str, shape: MeshShape | None) -> dict:
    cfg = config(family, shape)
    model_cfg, cls = cfg.model_config(VOCAB), model_class(family)
    mesh = make_mesh(devices=jax.devices()[:1]) if shape is None else run_mesh(cfg, model_cfg)
    model = abstract_model(cls, model_cfg, mesh)
    optimizer = make_optimizer(cfg, model.abstract_params)
    shardings = train_state_shardings(model, optimizer, mesh)
    step = make_train_step(model, optimizer, learning_rate_schedule(cfg), shardings, mesh, mode=cfg.mode)
    with jax.set_mesh(mesh):
        state = init_train_state(init_params(cls, model_cfg, mesh, seed=0), optimizer, shardings, seed=0)
        losses = []
        for batch in batches():
            state, metrics = step(state, distributed.global_batch(batch, batch_sharding(mesh), BATCH))
            losses.append(float(metrics["loss"]))
    # Each parameter, and Adam's two moments of it, placed as its logical axes say under the rules.
    expected = {path: variable_spec(v) for path, v in nnx.to_flat_state(model.abstract_params)}
    adam = state.opt_state[1][0]  # chain(clip, adamw(...)): adamw's ScaleByAdamState
    placed = {}
    for name, tree in (("params", state.params), ("mu", adam.mu), ("nu", adam.nu)):
        for path, array in nnx.to_flat_state(nnx.State(tree)):
            placed[".".join(map(str, (name, *path)))] = (str(array.sharding.spec),
                                                        array.sharding.spec == expected[path])
    return {"losses": losses, "placed": placed, "mesh": dict(mesh.shape)}


def mesh_errors() -> dict[str, str]:
    """The messages of batches a mesh cannot split (these need more than one device)."""
    cases = {"batch": config("retnet", MeshShape(4, 2, 1)).replace(batch_size=6),
             "micro_batches": config("retnet", MeshShape(4, 2, 1)).replace(batch_size=16, micro_batches=4)}
    out = {}
    for name, cfg in cases.items():
        try:
            run_mesh(cfg, cfg.model_config(VOCAB))
        except ValueError as err:
            out[name] = str(err)
    return out


def main():
    assert jax.device_count() == 8, jax.devices()
    report = {family: {name: run(family, shape) for name, shape in MESHES.items()}
              for family in (sys.argv[1:] or ["retnet", "transformer"])}
    report["errors"] = mesh_errors()
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
