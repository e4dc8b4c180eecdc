"""`TrainConfig`: everything one training run needs, as a frozen dataclass readable from JSON/YAML.

`TrainConfig()` is the README's main job (a small RetNet on the built-in corpus, minutes on a
2-core CPU). Override fields in Python (`TrainConfig(steps=100)`, `cfg.replace(...)`), from a file
(`TrainConfig.from_file("run.yaml")`) or with `key=value` strings (`cfg.override(["steps=100",
"model.d_model=128", "mesh.tensor=2"])`): `model.*` keys are `RetNetConfig` fields, `mesh.*` the
mesh's axis sizes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from retnet_jax.config import RetNetConfig, literal_choices

Family = Literal["retnet", "transformer"]

# The main job's model when no preset is named: the "tiny" preset widened and deepened until a few
# minutes of CPU training reach well under the corpus's byte entropy (measured: README "Training").
MAIN_JOB_MODEL: dict[str, Any] = dict(d_model=192, n_layers=3, n_heads=3, value_dim=384,
                                      ffn_dim=384, chunk_size=64)

# Token-embedding rows are padded to a multiple of this, so that tensor parallelism (up to 64
# devices) can split the vocabulary; the byte tokenizer's 257 ids become 320 rows.
VOCAB_MULTIPLE = 64

# Fields a resumed run may change: how long and how it runs, not what it trains.
RUN_CONTROL_FIELDS = frozenset({
    "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
    "keep_best", "workdir", "mesh", "sample_prompt", "sample_tokens", "sample_temperature"})


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices per mesh axis (`sharding.MESH_AXES`); `data=None`: whatever fsdp x tensor leave."""

    data: int | None = None
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if not (value is None and name == "data") and not _is_positive_int(value):
                raise ValueError(f"mesh.{name} must be a positive int, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        """`"data=2,fsdp=2,tensor=2"` (any subset, any order) -> `MeshShape`."""
        sizes = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"mesh {text!r}: write axis=size pairs from data, fsdp, tensor, "
                                 f"e.g. data=2,fsdp=2,tensor=2")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"mesh {text!r}: {name.strip()} must be an integer, got {value!r}") from None
        return cls(**sizes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults: the main job, and the paper's optimizer recipe (AdamW with betas
    0.9/0.98, weight decay 0.05 off norms and embeddings, global-norm clip 2.0, linear warmup then
    linear decay)."""

    # Model: a RetNetConfig preset (None: the main job's model, `MAIN_JOB_MODEL` over "tiny") with
    # field overrides; "transformer" trains the baseline of the same size (TransformerConfig.from_retnet).
    family: Family = "retnet"
    preset: str | None = None
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    mode: Literal["chunkwise", "parallel"] = "chunkwise"  # RetNet's training form
    precision: Literal["float32", "bfloat16"] = "float32"  # bfloat16: bf16 compute, float32 weights

    # Data: a source of retnet_jax.data.lm_dataset, a tokenizer (None: bytes), global batch.
    data: str = "default"
    tokenizer: str | None = None
    seq_len: int = 256
    batch_size: int = 16
    micro_batches: int = 1  # gradient accumulation: batch_size rows in this many sequential parts
    seed: int = 0  # parameters, data order and dropout

    # Optimizer and schedule.
    steps: int = 300
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    final_learning_rate: float = 0.0  # as a fraction of learning_rate, reached at `steps`
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_norm: float | None = 2.0
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)**2), PaLM's auxiliary loss

    # Run control.
    mesh: MeshShape = dataclasses.field(default_factory=MeshShape)
    workdir: str = "runs/main"
    log_every: int = 10
    eval_every: int = 100  # and at the end; 0: no evaluation
    eval_batches: int | None = 16  # per periodic evaluation (None: all); the final one reads all
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    keep_best: bool = False  # also keep the checkpoint of the lowest validation loss
    sample_prompt: str = "def "
    sample_tokens: int = 200
    sample_temperature: float = 0.7

    def __post_init__(self):
        if isinstance(self.mesh, Mapping):
            object.__setattr__(self, "mesh", MeshShape(**_known(MeshShape, self.mesh, "mesh.")))
        if not isinstance(self.mesh, MeshShape):
            raise ValueError(f"mesh must be a MeshShape or a mapping, got {self.mesh!r}")
        if not isinstance(self.model, Mapping):
            raise ValueError(f"model must be a mapping of RetNetConfig fields, got {self.model!r}")
        object.__setattr__(self, "model", dict(self.model))
        for name in ("seq_len", "batch_size", "micro_batches", "steps", "log_every",
                     "checkpoint_every", "keep_checkpoints"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "sample_tokens", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.eval_batches is not None and not _is_positive_int(self.eval_batches):
            raise ValueError(f"eval_batches must be a positive int or None, got {self.eval_batches!r}")
        for name in ("learning_rate", "eps"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("final_learning_rate", "weight_decay", "z_loss", "sample_temperature"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("b1", "b2"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.clip_norm is not None and (not _is_number(self.clip_norm) or self.clip_norm <= 0):
            raise ValueError(f"clip_norm must be a positive number or None, got {self.clip_norm!r}")
        for name, allowed in literal_choices(type(self)).items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by "
                             f"micro_batches={self.micro_batches}")
        if self.sample_tokens and (not isinstance(self.sample_prompt, str) or not self.sample_prompt):
            raise ValueError(f"sample_prompt must be non-empty text, got {self.sample_prompt!r}")
        if not isinstance(self.workdir, str) or not self.workdir:
            raise ValueError(f"workdir must be a non-empty path, got {self.workdir!r}")
        self.model_config(vocab_size=VOCAB_MULTIPLE)  # unknown presets and fields fail here

    # -- the model ------------------------------------------------------------------------------

    def model_config(self, vocab_size: int):
        """The `RetNetConfig` (or, for the Transformer family, `TransformerConfig`) this run trains,
        for a tokenizer of `vocab_size` ids (rows padded to `VOCAB_MULTIPLE`; `model.vocab_size`,
        when given, must hold them all)."""
        overrides = dict(self.model)
        rows = overrides.pop("vocab_size", VOCAB_MULTIPLE * math.ceil(vocab_size / VOCAB_MULTIPLE))
        if not _is_positive_int(rows) or rows < vocab_size:
            raise ValueError(f"model.vocab_size={rows!r} cannot hold the tokenizer's {vocab_size} ids")
        if self.precision == "bfloat16":
            overrides.update(dtype="bfloat16", param_dtype="float32")
        base = MAIN_JOB_MODEL if self.preset is None else {}
        try:
            cfg = RetNetConfig.preset(self.preset or "tiny", **{**base, **overrides, "vocab_size": rows})
        except ValueError as err:
            raise ValueError(f"model: {err}") from None
        if self.family == "transformer":
            from retnet_jax.baselines import TransformerConfig

            return TransformerConfig.from_retnet(cfg)
        return cfg

    # -- files and overrides --------------------------------------------------------------------

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (`mesh` as a dict)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["mesh"] = dataclasses.asdict(self.mesh)
        out["model"] = dict(self.model)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict`: absent keys take their defaults; unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a training config must be a mapping of fields, got {type(data).__name__}")
        return cls(**_known(cls, data, ""))

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        """A JSON or YAML file holding (some of) `to_dict`'s keys."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: no such file {str(path)!r}")
        try:
            data = yaml.load(path.read_text(), Loader=_Loader)  # YAML reads JSON too
        except yaml.YAMLError as err:
            raise ValueError(f"config: {path} is neither JSON nor YAML ({err.problem})") from None
        return cls.from_dict(data or {})

    def override(self, assignments: Iterable[str]) -> "TrainConfig":
        """`["steps=100", "model.d_model=128", "mesh.tensor=2"]` applied in order; values are read
        as YAML scalars (`1e-3`, `true`, `null`, `bfloat16`)."""
        data = self.to_dict()
        for text in assignments:
            key, sep, raw = text.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"--set {text!r}: write key=value, e.g. steps=100 or model.d_model=128")
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
            name, dot, sub = key.partition(".")
            if name not in data:
                raise ValueError(f"unknown config key {key!r}; keys are {sorted(data)}")
            if dot:
                if not isinstance(data[name], dict):
                    raise ValueError(f"config key {name!r} has no fields ({key!r})")
                data[name] = {**data[name], sub: value}
            else:
                data[name] = value
        return TrainConfig.from_dict(data)

    def differences(self, saved: Mapping[str, Any], vocab_size: int) -> list[str]:
        """What differs between this config and a `saved` one (`to_dict` of the run being resumed),
        as `"field: checkpoint X, now Y"`, ignoring `RUN_CONTROL_FIELDS`. The model is compared
        field by field after presets and overrides are resolved."""
        other = TrainConfig.from_dict(saved)
        out = []
        mine, theirs = (_fields(c.model_config(vocab_size)) for c in (self, other))
        if self.family != other.family:
            out.append(f"family: checkpoint {other.family!r}, now {self.family!r}")
        else:
            out += [f"model.{k}: checkpoint {theirs[k]!r}, now {mine[k]!r}"
                    for k in mine if mine[k] != theirs[k]]
        skip = RUN_CONTROL_FIELDS | {"family", "preset", "model", "precision"}
        out += [f"{f.name}: checkpoint {getattr(other, f.name)!r}, now {getattr(self, f.name)!r}"
                for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


class _Loader(yaml.SafeLoader):
    """YAML 1.2's numbers: PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$|^[-+]?\d+[eE][-+]?\d+$"),
    list("-+0123456789."))


def _known(cls, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(prefix + k) for k in unknown)}; keys are {sorted(names)}")
    return dict(data)


def _fields(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

