"""`retnet-jax train` and `retnet-jax eval` end to end, and every bad input as one error line.

The end-to-end runs are real processes (`python -m retnet_jax.cli`), a few steps of the tiny preset,
on the built-in corpus and on a folder of text files; they share a persistent compilation cache.
Bad inputs run in-process (`cli.main`): each must fail before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import relative_error
from retnet_jax import cli
from retnet_jax.train.metrics import EVAL_KEYS, TRAIN_KEYS, read_metrics
from test_data_sources import write_corpus

QUICK = ["--preset", "tiny", "--steps", "4", "--seq-len", "32", "--batch", "4",
         "--set", "log_every=1", "--set", "eval_every=2", "--set", "eval_batches=2",
         "--set", "checkpoint_every=2", "--set", "sample_tokens=24"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    variables = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
                 "RETNET_JAX_CACHE": str(root / "cache"),
                 "JAX_COMPILATION_CACHE_DIR": str(root / "compiled"),
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return root, variables


def retnet_jax(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retnet_jax.cli", *map(str, args)], capture_output=True,
                          text=True, env=env[1], timeout=900)


@pytest.fixture(scope="module")
def default_run(env):
    workdir = env[0] / "default"
    return workdir, retnet_jax(env, "train", *QUICK, "--workdir", workdir)


@pytest.fixture(scope="module")
def folder_run(env):
    folder = write_corpus(env[0] / "texts")  # 120 small files, 3 of them in validation
    workdir = env[0] / "folder"
    return workdir, retnet_jax(env, "train", *QUICK, "--data", folder, "--workdir", workdir)


@pytest.mark.parametrize("which", ["default_run", "folder_run"])
def test_train_writes_metrics_events_plot_checkpoint_and_prints_a_sample(request, which):
    workdir, done = request.getfixturevalue(which)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = read_metrics(workdir)
    assert [tuple(r) for r in lines if "loss" in r] == [TRAIN_KEYS] * 4
    assert [r["step"] for r in lines if "val_loss" in r] == [2, 4]
    assert all(tuple(r) == EVAL_KEYS for r in lines if "val_loss" in r)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert json.loads((workdir / "config.json").read_text())["steps"] == 4
    out = done.stdout
    assert "completed at step 4" in out and "validation loss" in out
    assert "byte unigram entropy of the validation split" in out
    assert "sample:\ndef " in out


def test_eval_prints_the_final_validation_loss_of_the_checkpoint(env, default_run):
    """The same parameters on the same (whole) split: the training run's last validation loss,
    to float32 rounding of a differently batched sum (1e-5)."""
    workdir, _ = default_run
    done = retnet_jax(env, "eval", "--checkpoint", workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    final = [r for r in read_metrics(workdir) if "val_loss" in r][-1]
    assert result["step"] == 4
    assert relative_error(result["val_loss"], final["val_loss"]) <= 1e-5


def test_generate_continues_a_prompt_from_a_trainer_workdir(env, folder_run):
    workdir, _ = folder_run
    done = retnet_jax(env, "generate", "--checkpoint", workdir, "--prompt", "decay",
                      "--max-new-tokens", 8)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("decay")


@pytest.mark.parametrize("args, message", [
    (["--mesh", "data=2"], r"mesh: data x fsdp x tensor = 2 x 1 x 1 = 2 must equal the number of devices, 1"),
    (["--preset", "tiny", "--mesh", "tensor=4"],
     r"mesh: tensor=4 does not divide the model's n_heads=2 \(heads are split over tensor\)"),
    (["--mesh", "model=2"], r"mesh 'model=2': write axis=size pairs from data, fsdp, tensor"),
    (["--data", "/nonexistent/texts"], r"source: no file or folder at '/nonexistent/texts'"),
    (["--data", "tfds:no_such_dataset"], r"source: unknown TFDS dataset 'no_such_dataset'"),
    (["--preset", "huge"], r"model: unknown preset 'huge'; choose from"),
    (["--set", "stpes=3"], r"unknown config key 'stpes'"),
    (["--set", "model.d_modle=3"], r"model: unknown RetNetConfig fields \['d_modle'\]"),
    (["--config", "/nonexistent/run.yaml"], r"config: no such file '/nonexistent/run.yaml'"),
    (["--resume"], r"--resume: there is no checkpoint to resume in"),
    (["--seq-len", "0"], r"seq_len must be a positive int, got 0"),
    (["--steps", "-3"], r"steps must be a positive int, got -3"),
    (["--batch", "0"], r"batch_size must be a positive int, got 0"),
    (["--batch", "6", "--set", "micro_batches=4"], r"batch_size=6 must be divisible by micro_batches=4"),
])
def test_each_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, args, message):
    workdir = tmp_path / "run"
    assert cli.main(["train", *args, "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("retnet-jax train: error: "), err
    assert re.search(message, err), err
    assert not workdir.exists()


def test_a_resume_of_another_config_loses_nothing(default_run, capsys):
    workdir, _ = default_run
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    code = cli.main(["train", *QUICK, "--steps", "8", "--set", "model.n_layers=3", "--workdir",
                     str(workdir), "--resume"])
    assert code == 1
    assert "differing: model.n_layers: checkpoint 2, now 3" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_eval_of_a_folder_without_a_run_is_one_error_line(tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(tmp_path)]) == 1
    assert f"no training run in '{tmp_path}'" in capsys.readouterr().err
