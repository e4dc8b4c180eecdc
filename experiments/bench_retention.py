"""Benchmark the three forms of retention and a 6-layer RetNet against this machine's matmul rate.

    python experiments/bench_retention.py                 # full table, T = 512 ... 16384
    python experiments/bench_retention.py --quick         # a smoke run in seconds

Prints a table, writes JSON (and a plot when matplotlib is installed) to experiments/results/:
bench_retention.json/.png, or bench_retention_quick.json/.png with --quick, which never replaces the
committed full results. The ops run with the kernels a model built here would pick
(`resolve_kernels("auto")`: the hand-written "xla_cpu" backward passes on a CPU).
Every rate is compared with the float32 matmul GFLOP/s measured in the same run. GF/s counts the
matmul FLOPs each form executes, the masked upper half of each causal block included (what the
hardware does); the JSON also gives the useful rate, without those masked products.
Forward+backward counts 3x forward. When torch and torchscale 0.3.0 are installed, the official
PyTorch RetNet of the same size is timed in the same run (its chunkwise mode, chunk 512) and the
model line is given as a ratio to it; `--no-torchscale` skips that. `--matmul-precision highest` makes
a GPU compute float32 matmuls fully rather than as TF32 (JAX's default there); the JSON records which.

On Linux with glibc the script re-executes itself once with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(`--no-hugepages` opts out): XLA:CPU allocates each step's scratch memory (0.67 GB for the 2048-token
model step) afresh, and with transparent huge pages in "madvise" mode the kernel faults it in 4 KiB
at a time: 330,000 page faults and ~12% of the step's CPU time, 6,000 faults with the tunable
(2-core Xeon, measured when that scratch was 1.3 GB). Both models share the process, so the torchscale line runs under the same setting;
the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def reexec_with_huge_pages(argv: list[str], script: str = __file__) -> None:
    """Run `script` (this one by default) again with glibc's malloc asking for transparent huge pages
    (see above)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "--no-hugepages" in argv
            or HUGE_PAGES in tunables):
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGE_PAGES]))}
    os.execve(sys.executable, [sys.executable, os.path.abspath(script), *argv], env)


if __name__ == "__main__":
    reexec_with_huge_pages(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from retnet_jax import RetNet, RetNetConfig  # noqa: E402
from retnet_jax.losses import cross_entropy  # noqa: E402
from retnet_jax.ops import (  # noqa: E402
    chunkwise_retention,
    official_log_decay,
    parallel_retention,
    recurrent_retention,
)
from retnet_jax.ops.kernels import resolve_kernels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL_RESULTS, QUICK_RESULTS = "bench_retention.json", "bench_retention_quick.json"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            huge_pages = f.read().strip()
    except OSError:
        huge_pages = None
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0]), "jax": jax.__version__, "python": platform.python_version(),
            "transparent_hugepage": huge_pages, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "matmul_precision": jax.config.jax_default_matmul_precision or "default",
            "float32_matmul_relative_error": float32_matmul_error()}


def float32_matmul_error(n: int = 512) -> float:
    """Norm-wise relative error of a float32 `[n, n] @ [n, n]` at the run's matmul precision, against
    float64 numpy: ~1e-7 when float32 matmuls are computed fully, ~1e-4 as TF32 (a GPU's default)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    got = np.asarray(jax.jit(jnp.matmul)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)), np.float64)
    exact = a @ b
    return float(np.abs(got - exact).max() / np.abs(exact).max())


def available_bytes() -> int:
    """Free memory of the device the benchmark runs on: the accelerator's own where JAX reports it
    (GPU), else the host's MemAvailable (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports memory
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return 1 << 62


def interleaved_times(steps: dict, rounds: int) -> dict:
    """Wall time of each zero-argument step in each of `rounds` rounds, the steps taking turns within
    a round, so a slow spell of a shared machine hits all alike: `{name: [seconds per round]}`.

    Each timed call follows an untimed call of the same step: a step run right after a *different*
    program is slower (measured: our 2048-token training step took 5.5 s after a torchscale step
    against 4.3 s after one of its own, while torchscale's was not slowed by ours), so plain
    alternation would charge one side for the other's after-effects.
    """
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            jax.block_until_ready(step())
            start = time.perf_counter()
            jax.block_until_ready(step())
            times[name].append(time.perf_counter() - start)
    return times


def best_times_interleaved(steps: dict, repeats: int) -> dict:
    """Minimum wall time of each step over `repeats` interleaved rounds (`interleaved_times`)."""
    return {name: min(t) for name, t in interleaved_times(steps, repeats).items()}


def paired_ratio(ours_s: list, theirs_s: list) -> dict:
    """Our throughput over theirs in each round (their step time / ours, two steps timed moments
    apart), summarised as the median and quartiles over rounds. A ratio per round cancels the drift
    of a shared machine; a ratio of two minima, each from whichever round was luckiest, does not."""
    ratios = sorted(t / o for o, t in zip(ours_s, theirs_s))
    return {"median": float(np.median(ratios)), "q1": float(np.percentile(ratios, 25)),
            "q3": float(np.percentile(ratios, 75)), "rounds": ratios}


def best_time(fn, *args, repeats: int) -> float:
    """Minimum wall time of `repeats` calls after one warm-up (compilation excluded)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(repeats: int) -> float:
    """The machine's own float32 matmul rate: the best of a few square sizes."""
    rates = []
    for n in (1024, 2048, 3072):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        t = best_time(jax.jit(jnp.matmul), a, a, repeats=repeats)
        rates.append(2 * n**3 / t / 1e9)
    return max(rates)


# The model line's main products (forward shapes at T=2048): the fused q/k/v/gate projection, the FFN
# input and output, the logits, and the per-chunk scores of retention (16 = 4 heads x 4 chunks).
LIBRARY_SHAPES = {
    "[2048,512]x[512,3072]": ((2048, 512), (512, 3072)),
    "[2048,1024]x[1024,512]": ((2048, 1024), (1024, 512)),
    "[2048,512]x[512,8192]": ((2048, 512), (512, 8192)),
    "[16,512,128]x[16,128,512]": ((16, 512, 128), (16, 128, 512)),
}


def matmul_libraries(repeats: int) -> dict | None:
    """Float32 GFLOP/s of the model's main matmul shapes in XLA (this JAX) and in torch (its BLAS),
    measured alternately in this process; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    rows = {}
    for name, (a_shape, b_shape) in LIBRARY_SHAPES.items():
        a = jax.random.normal(jax.random.key(1), a_shape, jnp.float32)
        b = jax.random.normal(jax.random.key(2), b_shape, jnp.float32)
        flops = 2.0 * np.prod(a_shape) * b_shape[-1]
        xla = jax.jit(jnp.matmul)
        ta, tb = torch.from_numpy(np.asarray(a).copy()), torch.from_numpy(np.asarray(b).copy())
        steps = {"xla": lambda: xla(a, b), "torch": lambda: torch.matmul(ta, tb)}
        best = best_times_interleaved(steps, max(repeats, 5))
        rows[name] = {k: flops / t / 1e9 for k, t in best.items()}
    return rows


def form_flops(form: str, length: int, heads: int, dk: int, dv: int, chunk: int,
               useful: bool = False) -> float:
    """Matmul FLOPs of one forward pass (batch 1); `useful` leaves out the masked (future) products."""
    block = {"parallel": length, "chunkwise": min(chunk, length)}.get(form)
    if block is None:
        return 4.0 * length * heads * dk * dv  # recurrent: k^T v and q S per token
    keys_per_row = (block + 1) / 2 if useful else block  # a causal block: half of it is masked
    carried = 4.0 * length * heads * dk * dv if form == "chunkwise" else 0.0
    return 2.0 * length * keys_per_row * heads * (dk + dv) + carried


def compile_or_oom(fn, args):
    """Compile `fn`; return (compiled, None) or (None, reason) when it cannot fit in memory."""
    try:
        compiled = fn.lower(*args).compile()
    except Exception as err:  # noqa: BLE001 - report, don't crash
        return None, f"compile failed: {type(err).__name__}"
    try:
        mem = compiled.memory_analysis()
        need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    except Exception:  # noqa: BLE001 - not every backend reports memory
        need = 0
    if need > 0.8 * available_bytes():
        return None, f"OOM: needs {need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB free"
    return compiled, None


def bench_forms(lengths, chunk, repeats, kernels, heads=8, dk=64, dv=128):
    log_decay = jnp.asarray(official_log_decay(heads))
    forms = {
        "parallel": lambda q, k, v: parallel_retention(q, k, v, log_decay, kernels=kernels)[0],
        "chunkwise": lambda q, k, v: chunkwise_retention(q, k, v, log_decay, chunk_size=chunk,
                                                         kernels=kernels)[0],
        "recurrent": lambda q, k, v: recurrent_retention(q, k, v, log_decay)[0],
    }
    rows = []
    for length in lengths:
        keys = jax.random.split(jax.random.key(length), 4)
        q, k = (jax.random.normal(key, (1, length, heads, dk)) for key in keys[:2])
        v = jax.random.normal(keys[2], (1, length, heads, dv))
        cot = jax.random.normal(keys[3], (1, length, heads, dv))
        for name, fwd in forms.items():
            row = {"form": name, "T": length, "flops_fwd": form_flops(name, length, heads, dk, dv, chunk),
                   "useful_flops_fwd": form_flops(name, length, heads, dk, dv, chunk, useful=True)}
            grad = jax.grad(lambda q, k, v, f=fwd: jnp.vdot(f(q, k, v), cot), argnums=(0, 1, 2))
            for label, fn in (("fwd", jax.jit(fwd)), ("fwd_bwd", jax.jit(grad))):
                compiled, why = compile_or_oom(fn, (q, k, v))
                if compiled is None:
                    row[f"{label}_s"], row[f"{label}_note"] = None, why
                    continue
                try:
                    seconds = best_time(compiled, q, k, v, repeats=repeats)
                except Exception as err:  # noqa: BLE001
                    row[f"{label}_s"], row[f"{label}_note"] = None, f"failed: {type(err).__name__}"
                    continue
                factor = 3 if label == "fwd_bwd" else 1
                row[f"{label}_s"] = seconds
                row[f"{label}_gflops"] = factor * row["flops_fwd"] / seconds / 1e9
                row[f"{label}_useful_gflops"] = factor * row["useful_flops_fwd"] / seconds / 1e9
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row) -> str:
    def cell(label):
        if row.get(f"{label}_s") is None:
            return f"{row.get(f'{label}_note', '-'):>30}"
        return f"{row[f'{label}_s'] * 1e3:10.1f} ms {row[f'{label}_gflops']:7.1f} GF/s    "
    return f"{row['form']:>10} {row['T']:>6} | fwd {cell('fwd')} | fwd+bwd {cell('fwd_bwd')}"


# The model line: 6 layers, width 512, 4 heads, value 1024, FFN 1024, vocab 8192, chunk 512 (torchscale's
# defaults otherwise: GLU FFN with gelu, no embedding scale).
MODEL_CFG = RetNetConfig(vocab_size=8192, d_model=512, n_layers=6, n_heads=4, value_dim=1024, ffn_dim=1024,
                         chunk_size=512)


def retnet_step(cfg: RetNetConfig, length: int):
    """A compiled forward+backward step of this package's RetNet (chunkwise) on one random sequence."""
    model = RetNet(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, tokens):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens[:, :-1], mode="chunkwise")
        return cross_entropy(logits, tokens[:, 1:])

    step = jax.jit(jax.value_and_grad(loss_fn))
    tokens = jax.random.randint(jax.random.key(length), (1, length + 1), 0, cfg.vocab_size)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return (lambda: step(params, tokens)), n_params


def torchscale_step(cfg: RetNetConfig, length: int):
    """The same step in the official PyTorch code (torchscale 0.3.0, chunkwise mode, float32, all
    cores), or None with the reason when torch or torchscale is missing."""
    try:
        import torch

        from retnet_jax.interop import torchscale_args
        from retnet_jax.interop.official import import_torchscale
        ts = import_torchscale()
    except ImportError as err:
        return None, str(err)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    args = ts.RetNetConfig(**torchscale_args(cfg), chunkwise_recurrent=True)
    decoder = ts.RetNetDecoder(args, embed_tokens=torch.nn.Embedding(cfg.vocab_size, cfg.d_model)).train()
    tokens = torch.randint(0, cfg.vocab_size, (1, length + 1))

    def step():
        decoder.zero_grad(set_to_none=True)
        logits, _ = decoder(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach().numpy()

    return step, f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads"


def bench_model(lengths, rounds, with_torchscale: bool, cfg: RetNetConfig = MODEL_CFG):
    """Forward+backward tokens/s of a 6-layer RetNet LM in chunkwise mode (chunk 512), batch 1, and
    of torchscale's, their steps alternating for `rounds` rounds. Tokens/s come from the median step
    time; the comparison is the median of the per-round ratios (`paired_ratio`).
    Returns (our rows, torchscale rows)."""
    rows, torchscale_rows = [], []
    for length in lengths:
        ours, n_params = retnet_step(cfg, length)
        steps = {"ours": ours}
        theirs, note = torchscale_step(cfg, length) if with_torchscale else (None, "--no-torchscale")
        if theirs is not None:
            steps["torchscale"] = theirs
        elif length == lengths[0]:
            print(f"  torchscale not measured: {note}")
        times = interleaved_times(steps, rounds)
        matmul_params = n_params - cfg.vocab_size * cfg.d_model  # the input embedding is a gather
        per_layer = form_flops("chunkwise", length, cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim,
                               cfg.chunk_size)
        flops = 6.0 * matmul_params * length + 3.0 * cfg.n_layers * per_layer
        s = float(np.median(times["ours"]))
        rows.append({"T": length, "seconds": s, "best_seconds": min(times["ours"]),
                     "round_seconds": times["ours"], "tokens_per_s": length / s, "gflops": flops / s / 1e9,
                     "params": n_params})
        print(f"  RetNet 6x512 chunkwise fwd+bwd T={length:>5}: {length / s:8.0f} tokens/s "
              f"({s * 1e3:.0f} ms/step, median of {rounds}; {flops / s / 1e9:.1f} GF/s)", flush=True)
        if "torchscale" in times:
            s = float(np.median(times["torchscale"]))
            ratio = paired_ratio(times["ours"], times["torchscale"])
            torchscale_rows.append({"T": length, "seconds": s, "best_seconds": min(times["torchscale"]),
                                    "round_seconds": times["torchscale"], "tokens_per_s": length / s,
                                    "runtime": note, "ours_over_torchscale": ratio})
            print(f"  torchscale 0.3.0 ({note}) T={length:>5}: {length / s:8.0f} tokens/s "
                  f"({s * 1e3:.0f} ms/step); ours/torchscale per round: median {ratio['median']:.2f}x "
                  f"(quartiles {ratio['q1']:.2f}x-{ratio['q3']:.2f}x)", flush=True)
    return rows, torchscale_rows


def plot(rows, path: Path) -> bool:
    """The forms' times against T, saved to `path`; False (nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, label in zip(axes, ("fwd", "fwd_bwd")):
        for form in ("parallel", "chunkwise", "recurrent"):
            pts = [(r["T"], r[f"{label}_s"]) for r in rows if r["form"] == form and r.get(f"{label}_s")]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=form, base=2)
        ax.set_title({"fwd": "forward", "fwd_bwd": "forward + backward"}[label])
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds (B=1, H=8, dk=64, dv=128)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(result: dict, out: Path) -> None:
    """`out` (JSON) and the plot beside it (`.png`), saying what was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    png = out.with_suffix(".png")
    if plot(result["forms"], png):
        print(f"\nwrote {out} and {png}")
    else:
        print(f"\nwrote {out}; no PNG written (matplotlib is not installed)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--model-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per form and length (best kept)")
    parser.add_argument("--model-rounds", type=int, default=7,
                        help="alternating rounds of the model steps (medians kept)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--no-torchscale", action="store_true",
                        help="do not time the official PyTorch model beside ours")
    parser.add_argument("--no-hugepages", action="store_true",
                        help="do not re-run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (Linux, glibc)")
    parser.add_argument("--matmul-precision", choices=("default", "high", "highest"), default=None,
                        help="jax_default_matmul_precision for the whole run (default: JAX's own, which "
                             "computes float32 matmuls fully on CPU and as TF32 on recent GPUs)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the JSON to write (default: experiments/results/{FULL_RESULTS}, or "
                             f"{QUICK_RESULTS} with --quick); the plot goes beside it as .png")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / (QUICK_RESULTS if args.quick else FULL_RESULTS)
    elif args.quick and args.out.resolve() == (RESULTS / FULL_RESULTS).resolve():
        parser.error(f"--quick must not overwrite the committed {FULL_RESULTS}")
    if args.matmul_precision is not None:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    if args.quick:
        args.lengths, args.model_lengths, args.repeats, args.chunk_size = [64, 256], [128], 1, 64
        args.model_rounds = 2

    info = machine()
    kernels = resolve_kernels("auto")
    print(f"machine: {info}, kernels: {kernels}")
    rate = matmul_gflops(args.repeats)
    print(f"float32 matmul rate (this run, precision {info['matmul_precision']}, relative error "
          f"{info['float32_matmul_relative_error']:.1e}): {rate:.1f} GFLOP/s\n")
    print(f"retention forms (B=1, H=8, dk=64, dv=128, chunk {args.chunk_size})")
    rows = bench_forms(args.lengths, args.chunk_size, args.repeats, kernels)
    print("\nmodel (6 layers, d 512, 4 heads, value 1024, FFN 1024, vocab 8192, chunk 512, batch 1)")
    model_rows, torchscale_rows = bench_model(args.model_lengths, args.model_rounds, not args.no_torchscale)
    libraries = None if args.no_torchscale else matmul_libraries(args.repeats)
    if libraries:
        print("\nfloat32 matmul GFLOP/s of the model's main shapes, XLA (this JAX) vs torch, alternating")
        for name, r in libraries.items():
            print(f"  {name:>28}: XLA {r['xla']:6.1f}  torch {r['torch']:6.1f}  (XLA/torch {r['xla'] / r['torch']:.2f})")

    checks = summarise(rows, model_rows, torchscale_rows, rate, args.lengths)
    result = {"machine": info, "kernels": kernels, "matmul_gflops": rate, "chunk_size": args.chunk_size,
              "forms": rows, "model": model_rows, "torchscale": torchscale_rows,
              "matmul_libraries": libraries, "checks": checks}
    write_results(result, args.out)
    return 0


def summarise(rows, model_rows, torchscale_rows, rate, lengths) -> dict:
    """Print the issue's targets as measured ratios; nothing here asserts."""
    def t(form, length, label):
        return next((r.get(f"{label}_s") for r in rows if r["form"] == form and r["T"] == length), None)

    checks = {}
    print("\nchecks (ratios measured in this run)")
    for label in ("fwd", "fwd_bwd"):
        if t("chunkwise", 16384, label) and t("chunkwise", 2048, label):
            ratio = t("chunkwise", 16384, label) / t("chunkwise", 2048, label)
            checks[f"chunkwise_16384_over_2048_{label}"] = ratio
            print(f"  chunkwise {label} time 16384 / 2048 = {ratio:.2f} (linear: 8, target <= 9)")
    for length in [n for n in lengths if n >= 2048]:
        for label in ("fwd", "fwd_bwd"):
            c, p = t("chunkwise", length, label), t("parallel", length, label)
            if c:
                speedup = (p / c) if p else None
                checks[f"parallel_over_chunkwise_{label}_{length}"] = speedup
                shown = f"{speedup:.2f}x" if speedup else "parallel did not run"
                print(f"  T={length:>5} {label:>7}: chunkwise faster than parallel by {shown}")
    row = next((r for r in rows if r["form"] == "chunkwise" and r["T"] == 8192), None)
    if row and row.get("fwd_bwd_gflops"):
        frac = row["fwd_bwd_gflops"] / rate
        useful = row["fwd_bwd_useful_gflops"] / rate
        checks["chunkwise_8192_fwd_bwd_fraction_of_matmul"] = frac
        checks["chunkwise_8192_fwd_bwd_useful_fraction_of_matmul"] = useful
        print(f"  chunkwise fwd+bwd at 8192: {row['fwd_bwd_gflops']:.1f} GF/s executed = {100 * frac:.0f}% "
              f"of matmul (target >= 30%); {100 * useful:.0f}% counting only unmasked products")
    for m in model_rows:
        ref = next((r for r in torchscale_rows if r["T"] == m["T"]), None)
        frac = m["gflops"] / rate
        checks[f"model_tokens_per_s_{m['T']}"] = m["tokens_per_s"]
        checks[f"model_fraction_of_matmul_{m['T']}"] = frac
        ref_txt = ""
        if ref:
            ratio = ref["ours_over_torchscale"]
            checks[f"model_over_torchscale_{m['T']}"] = ratio["median"]
            ref_txt = (f"; torchscale {ref['tokens_per_s']:.0f} tokens/s: ours is {ratio['median']:.2f}x "
                       f"(median per round; quartiles {ratio['q1']:.2f}x-{ratio['q3']:.2f}x)")
        print(f"  model T={m['T']}: {m['tokens_per_s']:.0f} tokens/s, {100 * frac:.0f}% of matmul{ref_txt}")
    return checks


if __name__ == "__main__":
    sys.exit(main())
