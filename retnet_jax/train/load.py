"""A trained model back from a run's workdir, for inference: parameters only, no optimizer state.

    model, tokenizer, cfg = load_trained("runs/main")        # the latest checkpoint
    model, tokenizer, cfg = load_trained("runs/main", step=400)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from retnet_jax.data import Tokenizer, load_tokenizer
from retnet_jax.train.checkpointing import Checkpointer, checkpoint_dir
from retnet_jax.train.config import TrainConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # a copy of a SentencePiece tokenizer, so the run is self-contained


def model_class(family: str):
    if family == "transformer":
        from retnet_jax.baselines import Transformer

        return Transformer
    from retnet_jax.model import RetNet

    return RetNet


def read_config(workdir) -> TrainConfig:
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training run in {str(workdir)!r} (it has no {CONFIG_FILE})")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def run_tokenizer(cfg: TrainConfig, workdir=None) -> Tokenizer:
    """The run's tokenizer: its copy in `workdir` if there is one, else what `cfg` names."""
    copy = None if workdir is None else Path(workdir) / TOKENIZER_FILE
    return load_tokenizer(copy if copy is not None and copy.is_file() else cfg.tokenizer)


def keep_tokenizer(cfg: TrainConfig, workdir) -> None:
    """Copy a SentencePiece tokenizer file into `workdir` (nothing to copy for bytes)."""
    if cfg.tokenizer not in (None, "byte"):
        shutil.copyfile(cfg.tokenizer, Path(workdir) / TOKENIZER_FILE)


def load_trained(path, step: int | None = None) -> tuple[nnx.Module, Tokenizer, TrainConfig]:
    """`(model, tokenizer, train_config)` of the run in workdir `path`: the parameters of checkpoint
    `step` (default: the latest) on the default device, in the model the run trained."""
    workdir = Path(path)
    cfg = read_config(workdir)
    tokenizer = run_tokenizer(cfg, workdir)
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint of step {step} in {checkpoint_dir(workdir)}; it holds "
                             f"steps {sorted(steps)}")
        model_cfg = cfg.model_config(tokenizer.vocab_size)
        cls = model_class(cfg.family)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                              nnx.to_pure_dict(abstract))
        params = checkpointer.restore_params(target, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, params), tokenizer, cfg
