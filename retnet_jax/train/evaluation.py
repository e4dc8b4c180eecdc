"""Validation loss: the mean next-token cross-entropy over (the first batches of) a held-out split."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from retnet_jax.data import LMIterator, Tokenizer, corpus_stats, lm_dataset
from retnet_jax.sharding import make_mesh, state_shardings
from retnet_jax.train import distributed
from retnet_jax.train.config import TrainConfig
from retnet_jax.train.load import load_trained
from retnet_jax.train.state import Model
from retnet_jax.train.step import batch_sharding, make_eval_step


class Validation:
    """A held-out split, read in order from its start at every evaluation."""

    def __init__(self, batches: LMIterator, sharding, rows: int):
        self.batches, self.sharding, self.rows = batches, sharding, rows
        self._start = batches.get_state()

    def mean_loss(self, eval_step, params, max_batches: int | None = None) -> float:
        """Mean of the per-batch losses over the first `max_batches` batches (None: all; every batch
        holds the same number of tokens)."""
        self.batches.set_state(self._start)
        losses = []
        for index, local in enumerate(self.batches):
            if max_batches is not None and index >= max_batches:
                break
            losses.append(eval_step(params, distributed.global_batch(local, self.sharding, self.rows)))
        return float(np.mean(jax.device_get(losses)))


def open_validation(cfg: TrainConfig, tokenizer: Tokenizer, mesh, *, split: str = "validation",
                    data: str | None = None) -> Validation:
    """`split` of the run's data (or `data`) in batches of `cfg.batch_size`, this process's rows.
    Raises `ValueError` when the split is missing or holds less than one batch."""
    sharding = batch_sharding(mesh)
    index, count = distributed.data_shard(sharding, cfg.batch_size)
    batches = lm_dataset(cfg.data if data is None else data, split, seq_len=cfg.seq_len,
                         batch_size=cfg.batch_size, tokenizer=tokenizer, process_index=index,
                         process_count=count)
    return Validation(batches, sharding, cfg.batch_size)


def byte_entropy(cfg: TrainConfig, tokenizer: Tokenizer, split: str = "validation",
                 data: str | None = None) -> float | None:
    """Byte unigram entropy (nats) of the split, where the loss is per byte (the byte tokenizer):
    the loss a model knowing only byte frequencies would reach."""
    if tokenizer.fingerprint != "byte-utf8":
        return None
    return corpus_stats(cfg.data if data is None else data, split).byte_entropy_nats


def evaluate_checkpoint(workdir, *, step: int | None = None, data: str | None = None,
                        split: str = "validation", max_batches: int | None = None) -> dict[str, Any]:
    """Validation loss of a run's checkpoint (default: the latest) on one device: `{"step",
    "val_loss", "val_ppl", "batches", "byte_entropy"}`."""
    model, tokenizer, cfg = load_trained(workdir, step)
    mesh = make_mesh(devices=jax.devices()[:1])
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = nnx.to_pure_dict(state_shardings(params, mesh))
    eval_step = make_eval_step(Model(graphdef, shardings, params), mesh, mode=cfg.mode)
    validation = open_validation(cfg, tokenizer, mesh, split=split, data=data)
    with jax.set_mesh(mesh):
        loss = validation.mean_loss(eval_step, nnx.to_pure_dict(params), max_batches)
    batches = validation.batches.batches_per_epoch
    return {"step": step if step is not None else _latest(workdir), "val_loss": loss,
            "val_ppl": math.exp(min(loss, 700.0)),
            "batches": batches if max_batches is None else min(batches, max_batches),
            "byte_entropy": byte_entropy(cfg, tokenizer, split, data)}


def _latest(workdir) -> int | None:
    from retnet_jax.train.checkpointing import Checkpointer

    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()
