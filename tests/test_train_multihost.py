"""Two processes on localhost train one model together (`jax.distributed` with gloo CPU collectives,
2 CPU devices each, a (data=2, tensor=2) mesh) and agree with one process on one device fed the same
global batches.

Each process reads only its own rows of each batch (`distributed.data_shard`) and builds the global
arrays with `jax.make_array_from_process_local_data`; process 0 alone writes the metrics. Oracle:
the one-process run. Tolerance 1e-5 relative per step's loss (float32; the sharded program sums in
another order).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import relative_error
from retnet_jax.train import MeshShape, TrainConfig
from retnet_jax.train.metrics import read_metrics
from test_train_resume import write_train_only_corpus

DRIVER = Path(__file__).with_name("train_driver.py")
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    cfg = TrainConfig(preset="tiny", data=str(write_train_only_corpus(root / "corpus")), seq_len=32,
                      batch_size=4, steps=STEPS, warmup_steps=0, learning_rate=1e-3, log_every=1,
                      eval_every=0, checkpoint_every=100, sample_tokens=0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "RETNET_JAX_CACHE": str(root / "cache")}

    def command(workdir, changes=None):
        config = json.dumps(cfg.replace(workdir=str(root / workdir), **(changes or {})).to_dict())
        return [sys.executable, str(DRIVER), config]

    # Prepare the corpus once, in the one-process run, before two processes would race to.
    single = subprocess.run(command("single"), capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    address = f"127.0.0.1:{free_port()}"
    two = [subprocess.Popen(command("two", {"mesh": MeshShape(data=2, tensor=2)})
                            + ["--coordinator", address, "--num-processes", "2", "--process-id", str(i),
                               "--devices", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in two]
    for process, (_, err) in zip(two, outputs):
        assert process.returncode == 0, err[-3000:]
    return root, [json.loads(out.split("RESULT ")[-1]) for out, _ in outputs]


def losses(workdir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(workdir) if "loss" in r]


def test_both_processes_finish_the_run(runs):
    _, summaries = runs
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert [s["step"] for s in summaries] == [STEPS, STEPS]


def test_two_processes_agree_with_one_process_on_the_same_global_batches(runs):
    root, _ = runs
    two, one = losses(root / "two"), losses(root / "single")
    assert len(two) == len(one) == STEPS
    errors = [relative_error(a, b) for a, b in zip(two, one)]
    print(f"\ntwo processes vs one, relative loss difference per step: {errors}")
    assert max(errors) <= 1e-5, (two, one)


def test_only_process_0_writes_metrics_and_both_share_one_checkpoint(runs):
    root, _ = runs
    lines = read_metrics(root / "two")
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, STEPS + 1))  # once each
    assert sorted(p.name for p in (root / "two/checkpoints").iterdir()) == [str(STEPS)]
