"""A run's metrics: JSON lines in `WORKDIR/metrics.jsonl`, TensorBoard events (tensorboardX, no
TensorFlow) in `WORKDIR/tensorboard`, and the loss-curve PNG drawn from the JSON lines.

Training lines are `{"step", "loss", "learning_rate", "grad_norm", "tokens_per_s"}`, evaluation
lines `{"step", "val_loss", "val_ppl"}`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"
TRAIN_KEYS = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s")
EVAL_KEYS = ("step", "val_loss", "val_ppl")


def read_metrics(workdir) -> list[dict[str, Any]]:
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends metric lines and TensorBoard scalars; a no-op where `enabled` is False (processes
    other than 0). On resume from `resume_step`, lines of later steps (written after that
    checkpoint by the run that stopped) are dropped, so the file holds one history."""

    def __init__(self, workdir, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        workdir = Path(workdir)
        self.path = workdir / METRICS_FILE
        if resume_step is not None:
            kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        # purge_step hides the stopped run's events past the checkpoint from TensorBoard.
        self._board = SummaryWriter(str(workdir / TENSORBOARD_DIR),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        prefix = "eval" if "val_loss" in record else "train"
        for name, value in record.items():
            if name != "step":
                self._board.add_scalar(f"{prefix}/{name}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._board.close()


def eval_record(step: int, val_loss: float) -> dict[str, Any]:
    return {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}


def plot_losses(workdir, *, title: str = "") -> Path:
    """`WORKDIR/loss.png`: training and validation loss against step (nats per token)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(workdir) / LOSS_PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
