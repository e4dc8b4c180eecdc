"""Benchmark training: the train step against sequence length, compile time against depth, and the
`retnet-jax train` loop against its bare jitted step.

    python experiments/bench_training.py            # the full run (tens of minutes on 2 CPU cores)
    python experiments/bench_training.py --quick    # a smoke run with tiny sizes

1. Train-step tokens/s and memory for T = 512 ... 16384 (batch 1): RetNet chunkwise (chunk 512),
   RetNet parallel and the Transformer baseline of the same size (`TransformerConfig.from_retnet`,
   within 2% of the parameters): the paper's Table 4, scaled down to bench_retention's 6-layer model
   (d 512, 4 heads, value 1024, FFN 1024, vocab 8192). The step is the trainer's own (AdamW, donated
   state). Memory is XLA's compiled memory analysis (arguments + outputs + scratch) and the peak RSS
   of a process that ran only that step. Achieved FLOP/s count the matmul FLOPs the step executes
   (forward x 3; masked halves of causal blocks included, as the hardware does them) against the
   float32 matmul rate measured in the same process right after the step's timing (a shared
   machine's speed drifts over a long run; the run's start also records one).
2. Compile time of the train step with 6 and with 24 layers (the layers are one `lax.scan`):
   trace + lower, and XLA compile, in fresh processes, the depths alternating for 5 rounds; the
   ratio is the median of the per-round ratios.
3. The loop: `train()` on the main job's config (data pipeline, metrics, progress bar,
   checkpoints) against its bare jitted step fed pre-placed batches, the two taking turns.

Each measurement of 1 and 2 runs in a fresh process (peak RSS is per process; compile caches stay
cold); `--quick` runs them all in one process. Writes a table to stdout and JSON + PNG to
experiments/results/bench_training.{json,png} (`--quick`: bench_training_quick.*). Re-runs itself
with transparent huge pages, as bench_retention.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_retention import (  # noqa: E402
    MODEL_CFG,
    available_bytes,
    compile_or_oom,
    form_flops,
    machine,
    matmul_gflops,
    reexec_with_huge_pages,
)

if __name__ == "__main__":
    reexec_with_huge_pages(sys.argv[1:], __file__)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from retnet_jax.sharding import make_mesh  # noqa: E402
from retnet_jax.train import TrainConfig, train  # noqa: E402
from retnet_jax.train.load import model_class, run_tokenizer  # noqa: E402
from retnet_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from retnet_jax.train.state import (  # noqa: E402
    abstract_model,
    init_params,
    init_train_state,
    train_state_shardings,
)
from retnet_jax.train.step import make_train_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL, QUICK = "bench_training.json", "bench_training_quick.json"
SECTIONS = ("steps", "compile", "loop")
KINDS = (("retnet", "chunkwise"), ("retnet", "parallel"), ("transformer", "parallel"))
WIDTHS = {k: getattr(MODEL_CFG, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "value_dim",
                                           "ffn_dim", "chunk_size")}
QUICK_WIDTHS = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=2, value_dim=128, ffn_dim=128,
                    chunk_size=32)


def step_config(family: str, mode: str, length: int, widths: dict) -> TrainConfig:
    return TrainConfig(family=family, mode=mode, preset="tiny", model=widths, seq_len=length,
                       batch_size=1, steps=1000, warmup_steps=10)


def build_step(cfg: TrainConfig):
    """(jitted train step, state factory, model config) exactly as `train()` builds them, one device."""
    mesh = make_mesh(devices=jax.devices()[:1])
    model_cfg, cls = cfg.model_config(run_tokenizer(cfg).vocab_size), model_class(cfg.family)
    model = abstract_model(cls, model_cfg, mesh)
    optimizer = make_optimizer(cfg, model.abstract_params)
    shardings = train_state_shardings(model, optimizer, mesh)
    step = make_train_step(model, optimizer, learning_rate_schedule(cfg), shardings, mesh, mode=cfg.mode)

    def fresh_state():
        return init_train_state(init_params(cls, model_cfg, mesh, seed=0), optimizer, shardings, seed=0)

    return step, fresh_state, model_cfg, mesh


def executed_flops(model_cfg, family: str, mode: str, length: int) -> float:
    """Matmul FLOPs of one forward+backward step (3x forward) on one sequence of `length` tokens."""
    d, layers = model_cfg.d_model, model_cfg.n_layers
    if family == "transformer":
        dense = layers * (4 * d * d + (3 if model_cfg.ffn == "glu" else 2) * d * model_cfg.ffn_dim)
        mixing = 4.0 * length * length * d  # scores and weighted values, the full T x T (XLA's attention)
    else:
        dense = layers * (d * model_cfg.n_heads * (2 * model_cfg.key_head_dim + 2 * model_cfg.value_head_dim)
                          + model_cfg.value_dim * d + 3 * d * model_cfg.ffn_dim)
        mixing = form_flops(mode, length, model_cfg.n_heads, model_cfg.key_head_dim,
                            model_cfg.value_head_dim, model_cfg.chunk_size)
    dense += model_cfg.vocab_size * d  # the output projection (the embedding is a gather)
    return 3.0 * (2.0 * dense * length + layers * mixing)


def measure_step(family: str, mode: str, length: int, widths: dict, repeats: int) -> dict:
    """One (model, T) point, in this (fresh) process: compile, memory, step times, peak RSS."""
    cfg = step_config(family, mode, length, widths)
    step, fresh_state, model_cfg, mesh = build_step(cfg)
    tokens = np.random.default_rng(length).integers(0, model_cfg.vocab_size, (1, length + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    with jax.set_mesh(mesh):
        state = fresh_state()
        began = time.perf_counter()
        compiled, oom = compile_or_oom(step, (state, batch))
        compile_s = time.perf_counter() - began
        if compiled is None:
            return {"family": family, "mode": mode, "T": length, "error": oom}
        memory = compiled.memory_analysis()
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - began)
    seconds = float(np.median(times))
    flops = executed_flops(model_cfg, family, mode, length)
    rate = matmul_gflops(2)  # measured here and now: a shared machine's speed drifts between points
    return {"family": family, "mode": mode, "T": length, "seconds": seconds, "step_seconds": times,
            "tokens_per_s": length / seconds, "gflops": flops / seconds / 1e9, "compile_s": compile_s,
            "matmul_gflops": rate, "fraction_of_matmul": flops / seconds / 1e9 / rate,
            "xla_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes,
            "xla_temp_bytes": memory.temp_size_in_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "params": sum(x.size for x in jax.tree.leaves(state.params))}


def measure_compile(layers: int, widths: dict, length: int) -> dict:
    """Trace + lower and XLA compile times of the RetNet train step with `layers` layers."""
    cfg = step_config("retnet", "chunkwise", length, {**widths, "n_layers": layers})
    step, fresh_state, _, mesh = build_step(cfg)
    batch = {"inputs": np.zeros((1, length), np.int32), "targets": np.zeros((1, length), np.int32)}
    with jax.set_mesh(mesh):
        state = fresh_state()
        began = time.perf_counter()
        lowered = step.lower(state, batch)
        lowered_at = time.perf_counter()
        lowered.compile()
    return {"layers": layers, "lower_s": lowered_at - began, "xla_compile_s": time.perf_counter() - lowered_at,
            "compile_s": time.perf_counter() - began}


def in_fresh_process(kind: str, spec: dict, timeout: float, fresh: bool = True) -> dict:
    """Run `--one KIND SPEC` in a new process and return its JSON (or the reason it failed);
    `fresh=False` (the smoke run): in this process. Compile times are measured without this script's
    huge-page tunable, as `retnet-jax train` runs (with it, the 24-layer XLA compile took 1.5x the
    6-layer one on the 2-core EPYC; without it, the same)."""
    if not fresh:
        return measure_step(**spec) if kind == "step" else measure_compile(**spec)
    env = dict(os.environ)
    if kind == "compile":
        env.pop("GLIBC_TUNABLES", None)
    try:
        done = subprocess.run([sys.executable, __file__, "--one", kind, json.dumps(spec), "--no-hugepages"],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


def bench_loop(cfg: TrainConfig, rounds: int) -> dict:
    """Tokens/s of `train(cfg)` (its own count: every step after the compiling first one, including
    data, metrics, progress bar and checkpoint saves; evaluation excluded) against the bare jitted
    step on batches already on the device, the two alternating for `rounds` rounds."""
    step, fresh_state, _, mesh = build_step(cfg)
    from retnet_jax.data import lm_dataset

    data = lm_dataset(cfg.data, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    batches = [jax.device_put(next(data)) for _ in range(cfg.steps)]
    loop, bare = [], []
    for round_ in range(rounds):
        with jax.set_mesh(mesh):
            state = fresh_state()
            state, metrics = step(state, batches[0])  # compiles
            jax.block_until_ready(metrics)
            began = time.perf_counter()
            for batch in batches[1:]:
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            bare.append((cfg.steps - 1) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - began))
        with tempfile.TemporaryDirectory() as workdir:
            summary = train(cfg.replace(workdir=workdir), progress=False)
        loop.append(summary["tokens_per_s"])
        print(f"  round {round_ + 1}: bare step {bare[-1]:8.0f} tokens/s, train loop {loop[-1]:8.0f} "
              f"tokens/s ({loop[-1] / bare[-1]:.1%})", flush=True)
    ratios = [a / b for a, b in zip(loop, bare)]
    return {"config": cfg.to_dict(), "bare_tokens_per_s": bare, "loop_tokens_per_s": loop,
            "loop_over_bare": ratios, "median_loop_over_bare": float(np.median(ratios))}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for family, mode in KINDS:
        points = [r for r in rows if (r["family"], r["mode"]) == (family, mode) and "seconds" in r]
        if not points:
            continue
        label = f"{family} {mode}" if family == "retnet" else "transformer"
        lengths = [r["T"] for r in points]
        axes[0].loglog(lengths, [r["tokens_per_s"] for r in points], "o-", base=2, label=label)
        axes[1].loglog(lengths, [r["xla_bytes"] / 2**30 for r in points], "o-", base=2, label=label)
        axes[2].semilogx(lengths, [r["fraction_of_matmul"] for r in points], "o-", base=2, label=label)
    for ax, title in zip(axes, ("train-step tokens/s (batch 1)", "XLA memory of the step (GiB)",
                                "achieved FLOP/s / float32 matmul rate")):
        ax.set_title(title)
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<20} {'T':>6} {'tokens/s':>9} {'step':>9} {'GFLOP/s':>8} {'of matmul':>9} "
             f"{'XLA mem':>9} {'peak RSS':>9}"]
    for r in rows:
        name = f"{r['family']} {r['mode']}" if r["family"] == "retnet" else "transformer"
        if "seconds" not in r:
            lines.append(f"{name:<20} {r['T']:>6}  {r['error']}")
            continue
        lines.append(f"{name:<20} {r['T']:>6} {r['tokens_per_s']:>9.0f} {r['seconds'] * 1e3:>7.0f}ms "
                     f"{r['gflops']:>8.1f} {r['fraction_of_matmul']:>9.0%} {r['xla_bytes'] / 2**30:>7.2f}G "
                     f"{r['peak_rss_bytes'] / 2**30:>7.2f}G")
    return "\n".join(lines)


def checks(rows: list[dict], compile_rows: list[dict], loop: dict, at: int) -> dict:
    """The issue's targets as measured in this run (nothing here asserts)."""
    point = {(r["family"], r["mode"]): r for r in rows if r["T"] == at and "seconds" in r}
    chunk = point.get(("retnet", "chunkwise"))
    out = {}
    for other in (("retnet", "parallel"), ("transformer", "parallel")):
        name = "parallel" if other[0] == "retnet" else "transformer"
        if chunk is None:
            continue
        if other in point:
            out[f"chunkwise_speedup_over_{name}_at_{at}"] = point[other]["seconds"] / chunk["seconds"]
            out[f"chunkwise_memory_fraction_of_{name}_at_{at}"] = chunk["xla_bytes"] / point[other]["xla_bytes"]
        else:
            out[f"{name}_at_{at}"] = next((r.get("error") for r in rows if (r["family"], r["mode"]) == other
                                           and r["T"] == at), "not run")
    depths = sorted({r["layers"] for r in compile_rows if "compile_s" in r})
    if len(depths) == 2:  # the median of per-round ratios: each round's two compiles ran moments apart
        for key in ("compile_s", "xla_compile_s"):
            shallow = [r[key] for r in compile_rows if r.get("layers") == depths[0]]
            deep = [r[key] for r in compile_rows if r.get("layers") == depths[1]]
            ratios = [b / a for a, b in zip(shallow, deep)]
            out[f"{key.removesuffix('_s')}_{depths[1]}_over_{depths[0]}_layers"] = float(np.median(ratios))
    out["loop_over_bare_step"] = loop["median_loop_over_bare"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (median kept)")
    parser.add_argument("--loop-steps", type=int, default=60)
    parser.add_argument("--loop-rounds", type=int, default=3)
    parser.add_argument("--compile-rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measured point")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--no-hugepages", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="measure only these sections (repeatable); the others are read back from "
                             "--out's existing results")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:  # a child process: one measurement
        kind, spec = args.one[0], json.loads(args.one[1])
        result = (measure_step(**spec) if kind == "step" else measure_compile(**spec))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    widths, loop_cfg = WIDTHS, TrainConfig(steps=args.loop_steps, log_every=10, eval_every=0,
                                           checkpoint_every=max(args.loop_steps // 3, 1), sample_tokens=0)
    compile_length, at = 512, 8192
    if args.quick:
        widths, args.lengths, args.repeats, compile_length, at = QUICK_WIDTHS, [64], 1, 64, 64
        loop_cfg = TrainConfig(preset="tiny", seq_len=64, batch_size=4, steps=8, log_every=4,
                               eval_every=0, checkpoint_every=4, sample_tokens=0)
        args.loop_rounds, args.compile_rounds = 1, 1
    out = args.out or RESULTS / (QUICK if args.quick else FULL)
    if args.quick and out.resolve() == (RESULTS / FULL).resolve():
        parser.error(f"--quick must not overwrite the committed {FULL}")

    sections = args.only or SECTIONS
    previous = json.loads(out.read_text()) if args.only and out.exists() else {}
    if args.only and not previous:
        parser.error(f"--only needs earlier results in {out}")
    info = machine()
    rate = matmul_gflops(max(args.repeats, 2))
    print(f"machine: {info}\nfloat32 matmul rate (this run): {rate:.1f} GFLOP/s, "
          f"{available_bytes() / 2**30:.1f} GiB free\n")
    rows = previous.get("steps", [])
    if "steps" in sections:
        print(f"train step, batch 1, widths {widths}")
        # With --only, the lengths measured now replace theirs; the other lengths' rows are kept.
        rows = [r for r in rows if r.get("T") not in args.lengths] if args.only else []
        for length in args.lengths:
            for family, mode in KINDS:
                spec = {"family": family, "mode": mode, "length": length, "widths": widths,
                        "repeats": args.repeats}
                row = in_fresh_process("step", spec, args.timeout, fresh=not args.quick)
                row.setdefault("T", length)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)

    compile_rows = previous.get("compile", [])
    if "compile" in sections:
        print(f"\ncompile time of the train step (T={compile_length}; fresh processes, depths alternating)")
        compile_rows = []
        for _ in range(args.compile_rounds):
            for layers in ((2, 4) if args.quick else (6, 24)):
                row = in_fresh_process("compile", {"layers": layers, "widths": widths,
                                                   "length": compile_length}, args.timeout, fresh=not args.quick)
                compile_rows.append(row)
                print(f"  {layers:>2} layers: trace + lower {row.get('lower_s', float('nan')):.1f} s, XLA "
                      f"compile {row.get('xla_compile_s', float('nan')):.1f} s", flush=True)

    loop = previous.get("loop")
    if "loop" in sections:
        print(f"\nthe train loop against its bare step ({loop_cfg.steps} steps, batch {loop_cfg.batch_size} "
              f"x {loop_cfg.seq_len})")
        loop = bench_loop(loop_cfg, args.loop_rounds)

    rows = sorted(rows, key=lambda r: r.get("T", 0))
    result = {"machine": info, "matmul_gflops": rate, "widths": widths, "steps": rows,
              "compile": compile_rows, "loop": loop, "checks": checks(rows, compile_rows, loop, at),
              "sections_measured_now": list(sections), "earlier_run": previous.get("machine"),
              "lengths_measured_now": list(args.lengths) if "steps" in sections else []}
    print("\n" + table(rows))
    print("\nchecks: " + json.dumps(result["checks"], indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
