"""The `retnet-jax` command line.

    retnet-jax convert-torchscale CHECKPOINT OUTDIR [--args JSON_FILE] [--param-dtype D] [--force]

converts a torchscale 0.3.0 RetNet checkpoint (a `RetNetDecoder` state dict, or a fairseq-style
`{"model": ...}` checkpoint, saved with torch.save or as .safetensors) into OUTDIR/params (an orbax
checkpoint of the parameters) and OUTDIR/config.json (the RetNetConfig). Read it back with
`retnet_jax.interop.load_converted(OUTDIR) -> (cfg, model)`.

    retnet-jax tokenizer train --data SOURCE --vocab-size N --out FILE [--model-type bpe|unigram]

trains a SentencePiece model on the lines of SOURCE's train split ("default", a file, folder or glob,
or "tfds:NAME") and writes it to FILE, for `retnet_jax.data.lm_dataset(..., tokenizer=FILE)`.

    retnet-jax train [--config FILE | --preset NAME] [--model retnet|transformer] [--data SOURCE]
                     [--tokenizer FILE] [--steps N] [--seq-len L] [--batch B] [--workdir DIR]
                     [--mesh data=2,fsdp=2,tensor=2] [--resume] [--set key=value ...]

trains a language model (`retnet_jax.train.train`); with no arguments, the README's main job: a
small RetNet on the built-in corpus, a few minutes on a 2-core CPU.

    retnet-jax eval --checkpoint DIR [--step N] [--data SOURCE] [--batches N]

prints the validation loss of a trainer workdir's checkpoint.

    retnet-jax generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                        [--top-k K] [--top-p P] [--seed S] [--tokenizer byte|FILE]

streams the continuation of TEXT to the terminal, from DIR: a convert-torchscale output, or a
trainer workdir (`retnet_jax.sampling.checkpoints.load_for_generation`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PARAM_DTYPES = ("float32", "bfloat16", "float16")


def _convert_torchscale(ns: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from retnet_jax.interop.torchscale import (
        count_parameters,
        load_torchscale,
        save_converted,
    )

    args = None
    if ns.args is not None:
        args = json.loads(Path(ns.args).read_text())
        if not isinstance(args, dict):
            raise ValueError(f"{ns.args} must hold a JSON object of torchscale RetNetConfig kwargs")
    overrides = {} if ns.param_dtype is None else {"param_dtype": getattr(jnp, ns.param_dtype)}
    if not Path(ns.checkpoint).is_file():
        raise FileNotFoundError(f"no such checkpoint file: {ns.checkpoint}")
    cfg, model = load_torchscale(ns.checkpoint, args, **overrides)
    outdir = save_converted(model, ns.outdir, force=ns.force)
    print(f"converted {ns.checkpoint} -> {outdir} ({count_parameters(model):,} parameters)")
    print(json.dumps(cfg.to_dict()))
    return 0


def _train_tokenizer(ns: argparse.Namespace) -> int:
    from retnet_jax.data.tokenizer_training import train_on_source

    tokenizer = train_on_source(ns.data, ns.out, vocab_size=ns.vocab_size, model_type=ns.model_type,
                                max_lines=ns.max_lines, cache_dir=ns.cache_dir)
    print(f"trained {tokenizer!r} on the train split of {ns.data!r} -> {ns.out}")
    return 0


def _generate(ns: argparse.Namespace) -> int:
    from retnet_jax.sampling.checkpoints import load_for_generation
    from retnet_jax.sampling.text import stream_text

    model, tokenizer = load_for_generation(ns.checkpoint, ns.tokenizer)
    pieces = stream_text(model, tokenizer, ns.prompt, max_new_tokens=ns.max_new_tokens,
                         temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed)
    sys.stdout.write(ns.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _train(ns: argparse.Namespace) -> int:
    import signal

    from retnet_jax.train import MeshShape, TrainConfig, TrainingDiverged, distributed, train
    from retnet_jax.train.report import describe

    if ns.distributed or ns.coordinator or ns.num_processes or ns.process_id is not None:
        distributed.initialize(ns.coordinator, ns.num_processes, ns.process_id)
    cfg = TrainConfig.from_file(ns.config) if ns.config else TrainConfig()
    flags = {"preset": ns.preset, "family": ns.model, "data": ns.data, "tokenizer": ns.tokenizer,
             "steps": ns.steps, "seq_len": ns.seq_len, "batch_size": ns.batch, "workdir": ns.workdir,
             "mesh": None if ns.mesh is None else MeshShape.parse(ns.mesh)}
    cfg = cfg.replace(**{k: v for k, v in flags.items() if v is not None}).override(ns.set)
    try:
        summary = train(cfg, resume=ns.resume)
    except TrainingDiverged as err:
        print(f"retnet-jax train: error: {err}", file=sys.stderr)
        return 1
    if distributed.is_main_process():
        print(describe(summary))
    if summary["status"] == "interrupted":  # the shell's convention: 128 + the signal's number
        return 128 + signal.Signals[summary["signal"]].value
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from retnet_jax.train import evaluate_checkpoint

    result = evaluate_checkpoint(ns.checkpoint, step=ns.step, data=ns.data, max_batches=ns.batches)
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retnet-jax", description="retnet_jax utilities")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser(
        "convert-torchscale",
        help="convert a torchscale 0.3.0 RetNet checkpoint to an orbax checkpoint + config.json",
        description="Convert a torchscale 0.3.0 RetNetDecoder checkpoint (torch.save'd state dict, "
                    "loaded with weights_only=True, or .safetensors; fairseq {'model': ...} "
                    "checkpoints and 'decoder.' prefixes accepted) into OUTDIR/params (orbax) and "
                    "OUTDIR/config.json.")
    convert.add_argument("checkpoint", metavar="CHECKPOINT")
    convert.add_argument("outdir", metavar="OUTDIR")
    convert.add_argument(
        "--args", metavar="JSON_FILE",
        help="the torchscale RetNetConfig kwargs as a JSON object (absent keys take torchscale's "
             "defaults). Without it, widths, depth, heads and flags are inferred from the weights "
             "and activation_fn, no_scale_embedding, layernorm_eps take torchscale's defaults "
             "(with a warning)")
    convert.add_argument("--param-dtype", choices=PARAM_DTYPES,
                         help="storage dtype of the converted parameters (default: the checkpoint's)")
    convert.add_argument("--force", action="store_true", help="overwrite an existing conversion")
    convert.set_defaults(func=_convert_torchscale)

    tokenizer = commands.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    tokenizer_commands = tokenizer.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = tokenizer_commands.add_parser(
        "train", help="train a SentencePiece model on a corpus",
        description="Train a SentencePiece model (exact round trip: no normalisation, byte "
                    "fallback) on the lines of a source's train split; nothing is downloaded.")
    train.add_argument("--data", required=True, metavar="SOURCE",
                       help='"default" (the Python standard library), a text file, folder or '
                            'glob, or tfds:NAME[/CONFIG][#FEATURE]')
    train.add_argument("--vocab-size", required=True, type=int, metavar="N")
    train.add_argument("--out", required=True, metavar="FILE", help="the model file to write")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--max-lines", type=int, default=1_000_000, metavar="N",
                       help="train on a random sample of at most N lines (default 1,000,000)")
    train.add_argument("--cache-dir", help="where local text is prepared (default "
                                           "$RETNET_JAX_CACHE or ~/.cache/retnet_jax)")
    train.set_defaults(func=_train_tokenizer)

    generate = commands.add_parser(
        "generate", help="stream a model's continuation of a prompt",
        description="Continue TEXT with a model and stream the text to the terminal; generation "
                    "stops at the tokenizer's end-of-document id or after --max-new-tokens tokens.")
    generate.add_argument("--checkpoint", required=True, metavar="DIR",
                          help="a convert-torchscale output (config.json + params/) or a trainer workdir")
    generate.add_argument("--prompt", required=True, metavar="TEXT")
    generate.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    generate.add_argument("--temperature", type=float, default=0.0, metavar="T",
                          help="0 (the default): greedy; else sample at this temperature")
    generate.add_argument("--top-k", type=int, default=None, metavar="K")
    generate.add_argument("--top-p", type=float, default=None, metavar="P")
    generate.add_argument("--seed", type=int, default=0, metavar="S")
    generate.add_argument("--tokenizer", default=None, metavar="byte|FILE",
                          help="a SentencePiece model file, or byte (default for converted "
                               "checkpoints; a trainer workdir brings its own)")
    generate.set_defaults(func=_generate)

    trainer = commands.add_parser(
        "train", help="train a RetNet (or the Transformer baseline) language model",
        description="Train a language model with retnet_jax.train. With no arguments: the main job, "
                    "a small RetNet on the built-in corpus (minutes on a 2-core CPU), ending with "
                    "its validation loss beside the byte entropy, a checkpoint and a sample.")
    source = trainer.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="a JSON or YAML file of TrainConfig fields")
    source.add_argument("--preset", metavar="NAME", help="a RetNetConfig preset (tiny, base, ...)")
    trainer.add_argument("--model", choices=("retnet", "transformer"), help="the model family")
    trainer.add_argument("--data", metavar="SOURCE",
                       help='"default", a text file, folder or glob, or tfds:NAME[/CONFIG][#FEATURE]')
    trainer.add_argument("--tokenizer", metavar="FILE", help="a SentencePiece model (default: bytes)")
    trainer.add_argument("--steps", type=int, metavar="N")
    trainer.add_argument("--seq-len", type=int, metavar="L")
    trainer.add_argument("--batch", type=int, metavar="B", help="the global batch, in sequences")
    trainer.add_argument("--workdir", metavar="DIR", help="checkpoints, metrics, config (default runs/main)")
    trainer.add_argument("--mesh", metavar="AXES", help="devices per mesh axis, e.g. data=2,fsdp=2,tensor=2")
    trainer.add_argument("--resume", action="store_true", help="continue the run in the workdir")
    trainer.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeatable): steps=100, model.d_model=128, "
                            "mesh.tensor=2, precision=bfloat16")
    trainer.add_argument("--distributed", action="store_true",
                         help="join a multi-process run (jax.distributed.initialize): on a cluster "
                              "JAX knows (SLURM, TPU, ...) it finds the processes itself; else give "
                              "--coordinator, --num-processes and --process-id")
    trainer.add_argument("--coordinator", metavar="HOST:PORT", help="the coordinator's address")
    trainer.add_argument("--num-processes", type=int, metavar="N")
    trainer.add_argument("--process-id", type=int, metavar="I")
    trainer.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="validation loss of a training checkpoint")
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR", help="a trainer workdir")
    evaluate.add_argument("--step", type=int, metavar="N", help="default: the latest checkpoint")
    evaluate.add_argument("--data", metavar="SOURCE", help="default: the run's own data")
    evaluate.add_argument("--batches", type=int, metavar="N", help="default: the whole split")
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, OSError, ImportError) as err:  # user errors: one line, no traceback
        print(f"retnet-jax {ns.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
