"""`train(config)`: the training loop around the jitted step.

Everything that can be wrong with a run (config, data, mesh, resume) is checked before anything is
written. Then: batches placed on the mesh, one jitted step per batch (the host fetches a step's
metrics only after the next step is queued, so the device never waits on logging), metrics every
`log_every` steps, validation every `eval_every`, asynchronous checkpoints every `checkpoint_every`
and on SIGTERM/SIGINT, and at the end a final validation, checkpoint, loss plot and sample.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx
from tqdm.auto import tqdm

from retnet_jax.data import LMIterator, Tokenizer, lm_dataset
from retnet_jax.sampling.text import generate_text
from retnet_jax.train import distributed
from retnet_jax.train.checkpointing import Checkpointer, checkpoint_dir
from retnet_jax.train.config import TrainConfig
from retnet_jax.train.evaluation import Validation, byte_entropy, open_validation
from retnet_jax.train.load import CONFIG_FILE, keep_tokenizer, model_class, read_config, run_tokenizer
from retnet_jax.train.mesh import run_mesh
from retnet_jax.train.metrics import MetricsWriter, eval_record, plot_losses
from retnet_jax.train.optimizer import learning_rate_schedule, make_optimizer
from retnet_jax.train.signals import StopRequest
from retnet_jax.train.state import (
    Model,
    TrainState,
    abstract_model,
    abstract_train_state,
    init_params,
    init_train_state,
    train_state_shardings,
)
from retnet_jax.train.step import batch_sharding, make_eval_step, make_train_step, metrics_to_host

StepHook = Callable[[int, dict[str, float]], None]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without saving that state."""


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
          on_step: StepHook | None = None) -> dict[str, Any]:
    """Train as `config` says; returns a summary dict (`status` "completed" or "interrupted",
    `step`, `loss`, `val_loss`, `val_ppl`, `byte_entropy`, `tokens_per_s`, `wall_s`, `checkpoint`,
    `sample`).

    resume: continue the run in `config.workdir` from its latest checkpoint (exactly: parameters,
      optimizer state, step, RNG and data position); its saved config must agree with `config`
      except for `RUN_CONTROL_FIELDS` (steps, intervals, mesh, ...). Without it, a workdir that
      already holds a checkpoint is refused.
    progress: show the progress bar and evaluation lines (process 0 only in any case).
    on_step: called as `on_step(step, metrics)` after every step (metrics on the host; this makes
      the loop wait for each step).

    Raises `ValueError`/`OSError` for bad input before writing anything, and `TrainingDiverged` when
    the loss stops being finite (the last checkpoint saved before that stays the latest).
    """
    started = time.perf_counter()
    run = _prepare(config, resume)
    main = distributed.is_main_process()
    say = (lambda text: tqdm.write(text)) if progress and main else (lambda text: None)
    if run.validation_note:
        say(run.validation_note)
    with jax.set_mesh(run.mesh), StopRequest() as stop:
        result = _loop(config, run, stop, say=say, progress=progress and main, on_step=on_step)
    result["wall_s"] = time.perf_counter() - started
    return result


@dataclasses.dataclass(frozen=True)
class _Run:
    """Everything built and checked before the loop starts (nothing written yet)."""

    workdir: Path
    resume: bool
    tokenizer: Tokenizer
    model_cfg: Any  # RetNetConfig or TransformerConfig
    mesh: jax.sharding.Mesh
    sharding: jax.sharding.NamedSharding  # of a batch
    batches: LMIterator  # this process's rows of the training batches
    validation: Validation | None
    validation_note: str | None
    cls: type
    model: Model
    optimizer: optax.GradientTransformation
    shardings: TrainState
    schedule: optax.Schedule


def _prepare(config: TrainConfig, resume: bool) -> _Run:
    workdir = Path(config.workdir).absolute()
    latest = _latest_checkpoint(workdir)
    if resume and latest is None:
        raise ValueError(f"--resume: there is no checkpoint to resume in {workdir}")
    if not resume and latest is not None:
        raise ValueError(f"{workdir} already holds a run (latest checkpoint: step {latest}); pass "
                         "--resume (resume=True) to continue it, or choose another workdir")
    if resume and latest >= config.steps:
        raise ValueError(f"--resume: the run in {workdir} is at step {latest}, not before "
                         f"steps={config.steps}; raise steps to train further")
    tokenizer = run_tokenizer(config, workdir if resume else None)
    if resume:
        differ = config.differences(read_config(workdir).to_dict(), tokenizer.vocab_size)
        if differ:
            raise ValueError(f"--resume: the checkpoint in {workdir} is of another config; differing: "
                             + "; ".join(differ))
    model_cfg = config.model_config(tokenizer.vocab_size)
    mesh = run_mesh(config, model_cfg)
    sharding = batch_sharding(mesh)
    shard_index, shard_count = distributed.data_shard(sharding, config.batch_size)
    batches = lm_dataset(config.data, "train", seq_len=config.seq_len, batch_size=config.batch_size,
                         tokenizer=tokenizer, seed=config.seed, process_index=shard_index,
                         process_count=shard_count)
    validation, note = None, None
    if config.eval_every:
        try:
            validation = open_validation(config, tokenizer, mesh)
        except ValueError as err:  # a small folder may hold no validation documents: train anyway
            note = f"no validation loss for this run: {err}"

    cls = model_class(config.family)
    model = abstract_model(cls, model_cfg, mesh)
    optimizer = make_optimizer(config, model.abstract_params)
    shardings = train_state_shardings(model, optimizer, mesh)
    return _Run(workdir=workdir, resume=resume, tokenizer=tokenizer, model_cfg=model_cfg, mesh=mesh,
                sharding=sharding, batches=batches, validation=validation, validation_note=note,
                cls=cls, model=model, optimizer=optimizer, shardings=shardings,
                schedule=learning_rate_schedule(config))


def _latest_checkpoint(workdir: Path) -> int | None:
    if not checkpoint_dir(workdir).is_dir():
        return None
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def _initial_state(config: TrainConfig, run: _Run, checkpointer: Checkpointer) -> TrainState:
    if run.resume:
        target = abstract_train_state(run.shardings, run.model, run.optimizer)
        state, data_state = checkpointer.restore(target)
        run.batches.set_state(data_state)
        return state
    params = init_params(run.cls, run.model_cfg, run.mesh, seed=config.seed)
    return init_train_state(params, run.optimizer, run.shardings, seed=config.seed)


def _loop(config: TrainConfig, run: _Run, stop: StopRequest, *, say, progress: bool,
          on_step: StepHook | None) -> dict[str, Any]:
    main = distributed.is_main_process()
    if main:
        run.workdir.mkdir(parents=True, exist_ok=True)
        (run.workdir / CONFIG_FILE).write_text(config.to_json())
        keep_tokenizer(config, run.workdir)
    checkpointer = Checkpointer(run.workdir, keep=config.keep_checkpoints, keep_best=config.keep_best)
    state = _initial_state(config, run, checkpointer)
    first_step = int(jax.device_get(state.step))
    writer = MetricsWriter(run.workdir, enabled=main, resume_step=first_step if run.resume else None)
    train_step = make_train_step(run.model, run.optimizer, run.schedule, run.shardings, run.mesh,
                                 mode=config.mode, micro_batches=config.micro_batches,
                                 z_loss=config.z_loss, dropout=getattr(run.model_cfg, "dropout", 0.0))
    eval_step = make_eval_step(run.model, run.mesh, mode=config.mode)
    tokens_per_step = config.batch_size * config.seq_len
    bar = tqdm(total=config.steps, initial=first_step, disable=not progress, unit="step",
               dynamic_ncols=True, smoothing=0.1)

    summary: dict[str, Any] = {"status": "completed", "loss": None, "val_loss": None, "val_ppl": None}
    saved_step = first_step if run.resume else None
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    window: list[dict[str, float]] = []
    window_start, window_steps, excluded = time.perf_counter(), 0, 0.0
    timed = {"steps": 0, "seconds": 0.0}  # every step after the first (compiling) one, eval excluded

    def drain(upto: int) -> None:
        """Bring the metrics of steps <= `upto` to the host; stop at a non-finite loss."""
        nonlocal pending
        ready = [(n, m) for n, m in pending if n <= upto]
        pending = [(n, m) for n, m in pending if n > upto]
        for n, metrics in ready:
            host = metrics_to_host(metrics)
            if not math.isfinite(host["loss"]):
                last = checkpointer.latest_step()
                raise TrainingDiverged(
                    f"the loss became {host['loss']} at step {n}; training stopped. The last good "
                    f"checkpoint is " + (f"step {last} in {checkpointer.directory}" if last is not None
                                         else "none (no checkpoint was saved before)"))
            window.append({"step": n, **host})
            if on_step is not None:
                on_step(n, host)

    def evaluate(step: int, max_batches: int | None) -> float | None:
        nonlocal excluded
        if run.validation is None:
            return None
        began = time.perf_counter()
        loss = run.validation.mean_loss(eval_step, state.params, max_batches)
        excluded += time.perf_counter() - began
        record = eval_record(step, loss)
        writer.write(record)
        summary.update(val_loss=loss, val_ppl=record["val_ppl"])
        say(f"step {step}: validation loss {loss:.4f} (perplexity {record['val_ppl']:.2f})")
        return loss

    def log(step: int) -> None:
        nonlocal window, window_start, window_steps, excluded
        if not window:
            return
        elapsed = time.perf_counter() - window_start - excluded
        tokens_per_s = window_steps * tokens_per_step / elapsed if window_steps and elapsed > 0 else 0.0
        record = {"step": step, "loss": sum(w["loss"] for w in window) / len(window),
                  "learning_rate": window[-1]["learning_rate"], "grad_norm": window[-1]["grad_norm"],
                  "tokens_per_s": tokens_per_s}
        writer.write(record)
        timed["steps"] += window_steps
        timed["seconds"] += elapsed
        summary["loss"] = record["loss"]
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        window, window_start, window_steps, excluded = [], time.perf_counter(), 0, 0.0

    def save(step: int, val_loss: float | None = None) -> None:
        nonlocal saved_step
        if saved_step == step:
            return
        drain(step)  # never save a state whose loss was not finite
        checkpointer.save(state, run.batches.get_state(), val_loss=val_loss)
        saved_step = step

    step = first_step
    try:
        while step < config.steps:
            received = stop.agreed(jax.process_count())
            if received is not None:
                summary["status"] = "interrupted"
                summary["signal"] = signal.Signals(received).name
                break
            batch = distributed.global_batch(next(run.batches), run.sharding, config.batch_size)
            state, metrics = train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            drain(step - 1)  # the previous step: done or nearly, while this one is queued
            window_steps += 1
            if step == first_step + 1:  # the first step compiled: time the steps after it
                drain(step)
                window_start, window_steps, excluded = time.perf_counter(), 0, 0.0
            if on_step is not None:
                drain(step)
            last = step == config.steps
            if step % config.log_every == 0 or last:
                drain(step)
                log(step)
            bar.update(1)
            val_loss = None
            if config.eval_every and step % config.eval_every == 0 and not last:
                val_loss = evaluate(step, config.eval_batches)
            if step % config.checkpoint_every == 0 and not last:
                save(step, val_loss)
        drain(step)
        log(step)
        if summary["status"] == "completed":
            save(step, evaluate(step, None))  # the final loss: the whole split
        else:
            save(step)
            say(f"stopped by {summary['signal']} at step {step}; checkpoint saved")
        checkpointer.wait()
    finally:
        bar.close()
        writer.close()
        checkpointer.close()

    if main:
        summary["plot"] = str(plot_losses(run.workdir, title=f"{config.family}, {config.data}"))
    summary.update(step=step, checkpoint=str(checkpointer.directory / str(step)),
                   tokens_per_s=(timed["steps"] * tokens_per_step / timed["seconds"]
                                 if timed["steps"] else None),
                   byte_entropy=byte_entropy(config, run.tokenizer) if run.validation else None,
                   sample=None)
    if summary["status"] == "completed" and config.sample_tokens:
        model = nnx.merge(run.model.graphdef, state.params)
        summary["sample"] = config.sample_prompt + generate_text(
            model, run.tokenizer, config.sample_prompt, max_new_tokens=config.sample_tokens,
            temperature=config.sample_temperature, seed=config.seed)[0]
    return summary
