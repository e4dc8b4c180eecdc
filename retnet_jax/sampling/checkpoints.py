"""A model and its tokenizer from a directory: a `convert-torchscale` output or a trainer workdir."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from retnet_jax.data.tokenizers import Tokenizer, load_tokenizer
from retnet_jax.interop.torchscale import CONFIG_FILE, PARAMS_DIR, load_converted


def is_converted(path: Path) -> bool:
    """Whether `path` holds what `save_converted` writes: `config.json` and `params/`."""
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def load_for_generation(path: str | os.PathLike, tokenizer: Tokenizer | str | None = None):
    """`(model, tokenizer)` from `path`.

    A converted checkpoint (`config.json` + `params/`) is read with `load_converted`; its tokenizer
    is `tokenizer` (None: byte-level). Any other directory goes to the trainer's
    `retnet_jax.train.load_trained(path) -> (model, tokenizer, train_config)` when that module
    exists; `tokenizer`, when given, replaces the one it returns. ValueError naming `checkpoint` for
    a directory that holds no model.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint: {str(path)!r} is not a directory")
    if is_converted(path):
        _, model = load_converted(path)
        return model, load_tokenizer(tokenizer)
    load_trained = _trainer_loader()
    if load_trained is None:
        raise ValueError(f"checkpoint: {str(path)!r} holds no model (no {CONFIG_FILE} and {PARAMS_DIR}/ "
                         "as convert-torchscale writes, and no trainer installed to read a workdir)")
    try:
        model, trained_tokenizer, _ = load_trained(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"checkpoint: {str(path)!r} holds no model the trainer can read ({err})") from err
    return model, trained_tokenizer if tokenizer is None else load_tokenizer(tokenizer)


def _trainer_loader():
    """`retnet_jax.train.load_trained`, or None before the trainer exists."""
    if importlib.util.find_spec("retnet_jax.train") is None:
        return None
    return getattr(importlib.import_module("retnet_jax.train"), "load_trained", None)
