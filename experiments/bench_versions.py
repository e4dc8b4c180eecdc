"""Two versions of this package, their training steps alternating in one run.

    python experiments/bench_versions.py --baseline 4884513 [--length 2048] [--rounds 15]

Checks the baseline commit out into a temporary git worktree and starts one worker process per
version (the working tree, and the baseline), each compiling the benchmark model's chunkwise
forward+backward step (experiments/bench_retention.py's model line). The parent then asks them for
one timed step each, in turns, for `--rounds` rounds, and reports the median of the per-round
ratios (baseline time / current time: above 1, the current version is faster) with quartiles.
Both workers use only the public API, so any version since the model line existed can be compared.
Prints a table and writes experiments/results/bench_versions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import sys, time
import jax
from flax import nnx
from retnet_jax import RetNet, RetNetConfig
from retnet_jax.losses import cross_entropy

length = int(sys.argv[1])
cfg = RetNetConfig(vocab_size=8192, d_model=512, n_layers=6, n_heads=4, value_dim=1024, ffn_dim=1024,
                   chunk_size=512)
graphdef, params = nnx.split(RetNet(cfg, rngs=nnx.Rngs(0)))

def loss_fn(params, tokens):
    logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], mode="chunkwise")
    return cross_entropy(logits, tokens[:, 1:])

step = jax.jit(jax.value_and_grad(loss_fn))
tokens = jax.random.randint(jax.random.key(length), (1, length + 1), 0, cfg.vocab_size)
for _ in range(2):
    jax.block_until_ready(step(params, tokens))
print("ready", flush=True)
for line in sys.stdin:
    start, cpu = time.perf_counter(), time.process_time()
    loss, _ = jax.block_until_ready(step(params, tokens))
    print(f"{time.perf_counter() - start:.6f} {time.process_time() - cpu:.6f} {float(loss):.6f}", flush=True)
"""


def start_worker(pythonpath: Path, length: int) -> subprocess.Popen:
    # Transparent huge pages for XLA:CPU's scratch memory, as bench_retention.py runs the model line.
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(length)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=pythonpath)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"worker for {pythonpath} failed to start: {line!r}")
    return proc


def timed_step(proc: subprocess.Popen) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all the worker's threads) of one step."""
    proc.stdin.write("go\n")
    proc.stdin.flush()
    wall, cpu, _ = proc.stdout.readline().split()
    return float(wall), float(cpu)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git commit of the previous release")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "experiments/results/bench_versions.json"))
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", args.baseline], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            workers = {"baseline": start_worker(worktree, args.length), "current": start_worker(ROOT, args.length)}
            times: dict[str, list[float]] = {name: [] for name in workers}
            cpu_times: dict[str, list[float]] = {name: [] for name in workers}
            for r in range(args.rounds):
                order = list(workers) if r % 2 == 0 else list(workers)[::-1]  # alternate who goes first
                for name in order:
                    wall, cpu = timed_step(workers[name])
                    times[name].append(wall)
                    cpu_times[name].append(cpu)
            for proc in workers.values():
                proc.stdin.close()
                proc.wait(timeout=60)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    ratios = np.asarray(times["baseline"]) / np.asarray(times["current"])
    # CPU time of the step's threads: less sensitive than wall time to other programs on the machine.
    cpu_ratios = np.asarray(cpu_times["baseline"]) / np.asarray(cpu_times["current"])
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "baseline": commit, "length": args.length, "rounds": args.rounds,
        "seconds": times, "median_seconds": {k: float(np.median(v)) for k, v in times.items()},
        "ratio_median": float(np.median(ratios)),
        "ratio_quartiles": [float(np.quantile(ratios, 0.25)), float(np.quantile(ratios, 0.75))],
        "cpu_seconds": cpu_times, "cpu_ratio_median": float(np.median(cpu_ratios)),
        "cpu_ratio_quartiles": [float(np.quantile(cpu_ratios, 0.25)), float(np.quantile(cpu_ratios, 0.75))],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"T={args.length}, {args.rounds} rounds: baseline {commit[:7]} {result['median_seconds']['baseline']:.3f} s, "
          f"current {result['median_seconds']['current']:.3f} s per step (median); current/baseline speed "
          f"{result['ratio_median']:.3f}x (quartiles {result['ratio_quartiles'][0]:.3f}-"
          f"{result['ratio_quartiles'][1]:.3f}); by CPU time {result['cpu_ratio_median']:.3f}x (quartiles "
          f"{result['cpu_ratio_quartiles'][0]:.3f}-{result['cpu_ratio_quartiles'][1]:.3f}); load average "
          f"{result['machine']['load_average']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
