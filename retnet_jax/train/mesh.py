"""The run's device mesh, checked against the model and the batch before anything is built.

The rules (`retnet_jax.sharding.RULES`) split heads, FFN units and vocabulary rows over `tensor`,
the model width over `fsdp`, and batch rows over `data` x `fsdp`: each of those sizes must divide
what it splits, and the mesh must use every device.
"""

from __future__ import annotations

import jax

from retnet_jax.sharding import make_mesh
from retnet_jax.train.config import TrainConfig


def run_mesh(cfg: TrainConfig, model_cfg) -> jax.sharding.Mesh:
    """The `(data, fsdp, tensor)` mesh of `cfg.mesh` over all devices (of all processes), after
    checking that the model and the batch split over it. Raises `ValueError` naming what does not."""
    shape = cfg.mesh
    splits = [("n_heads", "heads are", "tensor", shape.tensor),
              ("ffn_dim", "FFN units are", "tensor", shape.tensor),
              ("vocab_size", "vocabulary rows are", "tensor", shape.tensor),
              ("d_model", "the model width is", "fsdp", shape.fsdp)]
    for field, what, axis, devices in splits:
        size = getattr(model_cfg, field)
        if size % devices:
            raise ValueError(f"mesh: {axis}={devices} does not divide the model's {field}={size} "
                             f"({what} split over {axis})")
    try:
        mesh = make_mesh(shape.data, shape.fsdp, shape.tensor)
    except ValueError as err:
        raise ValueError(f"mesh: {str(err).removeprefix('make_mesh: ')}") from None
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.batch_size // cfg.micro_batches
    if rows % batch_devices:
        parts = f" (micro-batches of {rows} rows)" if cfg.micro_batches > 1 else ""
        raise ValueError(f"mesh: batch_size={cfg.batch_size}{parts} cannot be split over data x fsdp "
                         f"= {mesh.shape['data']} x {mesh.shape['fsdp']} = {batch_devices} devices")
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the "
                         f"{jax.process_count()} processes")
    return mesh
