"""The `retnet-jax` command line.

    retnet-jax convert-torchscale CHECKPOINT OUTDIR [--args JSON_FILE] [--param-dtype D] [--force]

converts a torchscale 0.3.0 RetNet checkpoint (a `RetNetDecoder` state dict, or a fairseq-style
`{"model": ...}` checkpoint, saved with torch.save or as .safetensors) into OUTDIR/params (an orbax
checkpoint of the parameters) and OUTDIR/config.json (the RetNetConfig). Read it back with
`retnet_jax.interop.load_converted(OUTDIR) -> (cfg, model)`.

    retnet-jax tokenizer train --data SOURCE --vocab-size N --out FILE [--model-type bpe|unigram]

trains a SentencePiece model on the lines of SOURCE's train split ("default", a file, folder or glob,
or "tfds:NAME") and writes it to FILE, for `retnet_jax.data.lm_dataset(..., tokenizer=FILE)`.
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
