"""Checkpoints of a run: an orbax `CheckpointManager` under `WORKDIR/checkpoints`.

Each step's checkpoint holds four items, so that a reader restores only what it needs:
`params` and `opt_state` (arrays, restored straight into their shardings), `progress` (step and
RNG) and `data` (the data iterator's JSON state). Saves are asynchronous: the call returns once the
arrays are copied off the devices, and orbax commits each checkpoint by renaming its temporary
folder, so a process killed mid-save leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from retnet_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "opt_state", "progress", "data")


def checkpoint_dir(workdir) -> Path:
    return Path(workdir).absolute() / CHECKPOINT_DIR


class Checkpointer:
    """Save and restore a run's `TrainState` and data-iterator state.

    Keeps the `keep` most recent checkpoints and, with `keep_best`, also the one of the lowest
    validation loss among those saved with one.
    """

    def __init__(self, workdir, *, keep: int = 3, keep_best: bool = False, read_only: bool = False):
        if read_only:  # a reader: creates nothing, deletes nothing (it never saves)
            options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
        else:
            policies = [checkpoint_managers.LatestN(keep)]
            if keep_best:
                policies.append(checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics["val_loss"], reverse=True, n=1,
                    keep_checkpoints_without_metrics=False))
            options = ocp.CheckpointManagerOptions(
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, data_state: dict[str, Any], *,
             val_loss: float | None = None) -> int:
        """Start saving `state` (at its own step) with the iterator state; returns the step."""
        step = int(jax.device_get(state.step))
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            progress=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            data=ocp.args.JsonSave(data_state))
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(step, args=args, metrics=metrics, force=True)
        return step

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """`(state, data_state)` of `step` (default: the latest), arrays placed as `target`'s
        `jax.ShapeDtypeStruct`s say (the mesh may differ from the one that saved them)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            opt_state=ocp.args.StandardRestore(target.opt_state),
            progress=ocp.args.StandardRestore({"step": target.step, "rng": target.rng}),
            data=ocp.args.JsonRestore()))
        progress = restored["progress"]
        state = TrainState(restored["params"], restored["opt_state"], progress["step"], progress["rng"])
        return state, restored["data"]

    def restore_params(self, target, step: int | None = None):
        """Only the parameters (what inference needs): a pure dict placed as `target` says."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))["params"]

    def wait(self) -> None:
        """Block until every started save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
