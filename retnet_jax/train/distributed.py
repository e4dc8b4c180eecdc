"""Several processes (hosts) training one model: joining the job, and each process's share of a batch.

Every process runs the same program on the global arrays; each reads only the batch rows its own
devices hold and hands them to `jax.make_array_from_process_local_data`. Process 0 alone writes
metrics, the config and the progress bar (orbax coordinates checkpoint writes itself).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize` with these values; with none given, JAX detects them itself on a
    cluster it knows (SLURM, Open MPI, Cloud TPU, Kubernetes). Call it before any other JAX call.
    A second call, or one in an already initialised process, does nothing."""
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def is_main_process() -> bool:
    return jax.process_index() == 0


def data_shard(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """`(index, count)` for `lm_dataset(process_index=index, process_count=count)`: this process's
    devices hold rows `[index * B / count, (index + 1) * B / count)` of the global batch. Processes
    whose devices hold the same rows (the batch replicated over them) read the same rows."""
    rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                   for s in sharding.addressable_devices_indices_map((global_batch, 1)).values()})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or global_batch % (stop - start):
        raise ValueError(f"this process's devices hold rows {rows} of the batch: not one contiguous "
                         "equal share (order the mesh's devices by process)")
    return start // (stop - start), global_batch // (stop - start)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding,
                 global_rows: int) -> dict[str, jax.Array]:
    """This process's rows `{name: [b, L]}` as the global arrays `[global_rows, L]` they are part of."""
    return {name: jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))
            for name, x in local.items()}
