"""Benchmark the data pipeline on the default corpus: one-time preparation, then tokens per second.

    python experiments/bench_data.py            # prepares into a fresh cache, ~1 minute on 2 cores
    python experiments/bench_data.py --quick    # a smoke run: small SentencePiece model, short timings

Preparation is timed from an empty cache: the standard library's files into ArrayRecord (both
splits), each tokenizer's token stream of the train split, and training the SentencePiece model
(8000 pieces, BPE, on the train split's lines). Throughput is the steady rate of `lm_dataset`'s
iterator once prepared: int32 input tokens delivered per second (global batch 8 x 2048, one
process), median of `--rounds` timed stretches. Prints a table and writes
experiments/results/bench_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from retnet_jax.data import corpus_stats, lm_dataset, train_on_source
from retnet_jax.data.default_corpus import stdlib_root
from retnet_jax.data.sources import open_documents

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import grain
    import sentencepiece
    import tensorflow_datasets

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "stdlib": str(stdlib_root()), "grain": getattr(grain, "__version__", "?"),
            "tensorflow_datasets": tensorflow_datasets.__version__,
            "sentencepiece": sentencepiece.__version__}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def tokens_per_second(make_iterator, seconds: float, rounds: int) -> dict:
    """Median rate over `rounds` stretches of about `seconds` each, after one warm-up batch."""
    it, build_s = timed(make_iterator)
    next(it)
    rates = []
    for _ in range(rounds):
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            tokens += next(it)["inputs"].size
        rates.append(tokens / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(rates), "rounds": rates, "build_s": build_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed stretch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1000 pieces, short stretches")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="default: a fresh temporary folder, so preparation is timed from empty")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_data.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab_size, args.seconds, args.rounds = 1000, 0.3, 2

    load_start = os.getloadavg()[0]  # the machine is shared: a loaded CPU slows every number here
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        model = Path(tmp) / f"stdlib_bpe{args.vocab_size}.model"
        shape = dict(seq_len=args.seq_len, batch_size=args.batch_size)

        prep = {}
        _, prep["arrayrecord_s"] = timed(lambda: open_documents("default", "train", cache))
        _, prep["byte_stream_s"] = timed(lambda: lm_dataset("default", "train", cache_dir=cache,
                                                             **shape))
        _, prep["sentencepiece_train_s"] = timed(lambda: train_on_source(
            "default", model, vocab_size=args.vocab_size, cache_dir=cache))
        _, prep["sentencepiece_stream_s"] = timed(lambda: lm_dataset(
            "default", "train", tokenizer=model, cache_dir=cache, **shape))
        _, prep["restart_s"] = timed(lambda: next(lm_dataset("default", "train", cache_dir=cache,
                                                              **shape)))

        rates = {
            "byte": tokens_per_second(lambda: lm_dataset("default", "train", cache_dir=cache,
                                                         **shape), args.seconds, args.rounds),
            f"sentencepiece_{args.vocab_size}": tokens_per_second(
                lambda: lm_dataset("default", "train", tokenizer=model, cache_dir=cache, **shape),
                args.seconds, args.rounds),
            "byte_1_worker": tokens_per_second(
                lambda: lm_dataset("default", "train", cache_dir=cache, worker_count=1, **shape),
                args.seconds, args.rounds),
        }
        corpus = {split: {"byte": vars(corpus_stats("default", split, cache_dir=cache)),
                          f"sentencepiece_{args.vocab_size}_tokens": corpus_stats(
                              "default", split, tokenizer=model, cache_dir=cache).tokens}
                  for split in ("train", "validation")}

    result = {"machine": machine(), "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
              "seq_len": args.seq_len, "batch_size": args.batch_size,
              "vocab_size": args.vocab_size, "preparation_s": prep, "throughput": rates,
              "default_corpus": corpus, "quick": args.quick}
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, Python {m['python']}: default corpus = {m['stdlib']}")
    print(f"load average (1 min) at start and end: {result['load_average_1min']['start']:.1f}, "
          f"{result['load_average_1min']['end']:.1f}")
    print("\none-time preparation (from an empty cache)")
    for name, seconds in result["preparation_s"].items():
        print(f"  {name:<24} {seconds:8.2f} s")
    print(f"\nthroughput, batch {result['batch_size']} x {result['seq_len']} (median of rounds)")
    for name, r in result["throughput"].items():
        print(f"  {name:<24} {r['tokens_per_s'] / 1e6:8.1f} M tokens/s")
    print("\ndefault corpus")
    print(f"  {'split':<11} {'files':>6} {'bytes':>11} {'byte tokens':>12} {'sp tokens':>11} "
          f"{'byte entropy':>13}")
    for split, s in result["default_corpus"].items():
        sp = next(v for k, v in s.items() if k.startswith("sentencepiece"))
        b = s["byte"]
        print(f"  {split:<11} {b['documents']:>6} {b['bytes']:>11,} {b['tokens']:>12,} {sp:>11,} "
              f"{b['byte_entropy_nats']:>8.4f} nats")


if __name__ == "__main__":
    raise SystemExit(main())
