"""Stopping and resuming: SIGTERM, kill -9 between checkpoints and during a save, refused resumes,
and a loss that stops being finite.

The oracle is an uninterrupted 20-step run of the same config. Runs that receive signals run in
their own processes (`train_driver.py`, which sends the signal from inside the loop right after a
given step, so the step is known); the runs share a persistent compilation cache, so each program
compiles once. Resumed runs must match the oracle bit for bit: the same compiled step on the same
parameters, optimizer state, RNG and batches gives the same floats.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from retnet_jax.data.text_builder import split_of
from retnet_jax.train import TrainConfig, TrainingDiverged, load_trained, train
from retnet_jax.train.checkpointing import Checkpointer
from retnet_jax.train.metrics import read_metrics

DRIVER = Path(__file__).with_name("train_driver.py")
STEPS, CHECKPOINT_EVERY = 20, 4


def write_train_only_corpus(folder: Path, n_files: int = 40, seed: int = 0) -> Path:
    """Files of random words, none of them in the validation split (runs then skip evaluation)."""
    rng = np.random.default_rng(seed)
    words = ["retention", "decay", "chunk", "state", "token", "def", "return", "(x)", "\n", "    "]
    folder.mkdir(parents=True, exist_ok=True)
    names = (f"doc{i:03d}.txt" for i in range(10 * n_files))
    for name in [n for n in names if split_of(n) == "train"][:n_files]:
        (folder / name).write_text(" ".join(rng.choice(words, size=300)) + "\n")
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    corpus = write_train_only_corpus(root / "corpus")
    cfg = TrainConfig(preset="tiny", data=str(corpus), seq_len=32, batch_size=4, steps=STEPS,
                      warmup_steps=5, learning_rate=1e-2, log_every=1, eval_every=0,
                      checkpoint_every=CHECKPOINT_EVERY, sample_tokens=0, workdir=str(root / "unused"))
    variables = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
                 "RETNET_JAX_CACHE": str(root / "cache"),
                 "JAX_COMPILATION_CACHE_DIR": str(root / "compiled"),
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return root, cfg, variables


@pytest.fixture(autouse=True)
def _data_cache(env, monkeypatch):
    """In-process runs prepare the corpus where the subprocesses do (not in the user's cache)."""
    monkeypatch.setenv("RETNET_JAX_CACHE", env[2]["RETNET_JAX_CACHE"])


def run(env, workdir: str, *args: str) -> subprocess.CompletedProcess:
    root, cfg, variables = env
    config = json.dumps(cfg.replace(workdir=str(root / workdir)).to_dict())
    return subprocess.run([sys.executable, str(DRIVER), config, *args], capture_output=True,
                          text=True, env=variables, timeout=600)


def summary_of(done: subprocess.CompletedProcess) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def train_lines(workdir: Path) -> list[tuple]:
    """(step, loss, learning_rate, grad_norm) of every training line (tokens/s is timing)."""
    return [(r["step"], r["loss"], r["learning_rate"], r["grad_norm"])
            for r in read_metrics(workdir) if "loss" in r]


def final_params(workdir: Path) -> list[np.ndarray]:
    model, _, _ = load_trained(workdir)
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def complete_steps(workdir: Path) -> list[int]:
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        return sorted(checkpointer.all_steps())
    finally:
        checkpointer.close()


@pytest.fixture(scope="module")
def runs(env):
    """Every run of this module, in order, once: the oracle, SIGTERM + resume, kill -9 between
    checkpoints + resume, kill -9 right after a save started + resume."""
    root = env[0]
    out = {"reference": summary_of(run(env, "reference"))}
    out["sigterm"] = run(env, "sigterm", "--signal-at", "10", "SIGTERM")
    out["sigterm_resumed"] = summary_of(run(env, "sigterm", "--resume"))
    out["kill"] = run(env, "kill", "--signal-at", "10", "SIGKILL", "--after-save", "8")
    out["kill_checkpoints"] = complete_steps(root / "kill")
    out["kill_resumed"] = summary_of(run(env, "kill", "--resume"))
    out["kill_in_save"] = run(env, "kill_in_save", "--signal-at", str(2 * CHECKPOINT_EVERY + 1), "SIGKILL")
    out["kill_in_save_checkpoints"] = complete_steps(root / "kill_in_save")
    out["kill_in_save_leftovers"] = sorted(p.name for p in (root / "kill_in_save/checkpoints").iterdir()
                                          if "tmp" in p.name)
    out["kill_in_save_resumed"] = summary_of(run(env, "kill_in_save", "--resume"))
    return out


def test_reference_run_logs_every_step_and_keeps_the_last_three_checkpoints(env, runs):
    root = env[0]
    assert runs["reference"]["status"] == "completed" and runs["reference"]["step"] == STEPS
    assert [line[0] for line in train_lines(root / "reference")] == list(range(1, STEPS + 1))
    assert complete_steps(root / "reference") == [12, 16, 20]


def test_sigterm_saves_at_that_step_and_the_resumed_run_equals_the_uninterrupted_one(env, runs):
    root = env[0]
    stopped = runs["sigterm"]
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert json.loads(stopped.stdout.split("RESULT ")[-1])["status"] == "interrupted"
    assert json.loads(stopped.stdout.split("RESULT ")[-1])["step"] == 10
    assert runs["sigterm_resumed"]["step"] == STEPS
    assert train_lines(root / "sigterm") == train_lines(root / "reference")  # bit for bit
    for a, b in zip(final_params(root / "sigterm"), final_params(root / "reference")):
        np.testing.assert_array_equal(a, b)


def test_kill_9_between_checkpoints_loses_only_the_steps_since_the_last_one(env, runs):
    root = env[0]
    assert runs["kill"].returncode == -signal.SIGKILL
    assert runs["kill_checkpoints"][-1] == 8  # killed at step 10: steps 9 and 10 are lost
    assert train_lines(root / "kill") == train_lines(root / "reference")
    for a, b in zip(final_params(root / "kill"), final_params(root / "reference")):
        np.testing.assert_array_equal(a, b)


def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(env, runs):
    """Killed one step after the save of step 8 started: that save is complete or its temporary
    folder is ignored; either way the run resumes from a complete checkpoint and matches."""
    root = env[0]
    assert runs["kill_in_save"].returncode == -signal.SIGKILL
    latest = runs["kill_in_save_checkpoints"][-1]
    assert latest in (4, 8) and (latest == 8 or runs["kill_in_save_leftovers"]), runs
    assert train_lines(root / "kill_in_save") == train_lines(root / "reference")


def test_a_half_written_checkpoint_is_not_resumed(env, runs, tmp_path):
    """What a kill during a save leaves: orbax's temporary folder, never committed."""
    workdir = tmp_path / "run"
    shutil.copytree(env[0] / "reference", workdir)
    shutil.copytree(workdir / "checkpoints/20", workdir / "checkpoints/24.orbax-checkpoint-tmp-1234")
    assert complete_steps(workdir)[-1] == 20


def test_resuming_with_another_model_config_is_refused_naming_the_fields(env, runs):
    root, cfg, _ = env
    before = (root / "reference/config.json").read_text(), (root / "reference/metrics.jsonl").read_text()
    other = cfg.replace(workdir=str(root / "reference"), steps=40, model={"d_model": 128}, seq_len=64)
    with pytest.raises(ValueError, match=r"another config; differing: model.d_model: checkpoint 64, "
                                         r"now 128; seq_len: checkpoint 32, now 64"):
        train(other, resume=True, progress=False)
    after = (root / "reference/config.json").read_text(), (root / "reference/metrics.jsonl").read_text()
    assert after == before


def test_a_fresh_run_refuses_a_workdir_that_holds_one_and_resume_needs_a_checkpoint(env, runs, tmp_path):
    root, cfg, _ = env
    with pytest.raises(ValueError, match=r"already holds a run \(latest checkpoint: step 20\); pass --resume"):
        train(cfg.replace(workdir=str(root / "reference")), progress=False)
    with pytest.raises(ValueError, match=r"--resume: there is no checkpoint to resume in"):
        train(cfg.replace(workdir=str(tmp_path / "empty")), resume=True, progress=False)
    assert not (tmp_path / "empty").exists()


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(env, tmp_path):
    """A learning rate of 1e30 overflows the parameters after the first updates."""
    _, cfg, _ = env
    cfg = cfg.replace(workdir=str(tmp_path / "nan"), learning_rate=1e30, warmup_steps=0, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"the loss became (nan|inf) at step (\d+); training "
                                              r"stopped. The last good checkpoint is step") as caught:
        train(cfg, progress=False)
    bad_step = int(caught.value.args[0].split(" at step ")[1].split(";")[0])
    finite = train_lines(tmp_path / "nan")
    assert [line[0] for line in finite] == list(range(1, bad_step))  # logged up to the step before
    assert complete_steps(tmp_path / "nan")[-1] == bad_step - 1
