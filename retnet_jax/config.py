"""`RetNetConfig`: one frozen dataclass for every RetNet variant, with named presets."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, ClassVar, Literal

import jax.numpy as jnp

from retnet_jax.ops.kernels import KernelChoice

Mode = Literal["parallel", "chunkwise", "recurrent"]
MODES: tuple[str, ...] = typing.get_args(Mode)
Activation = Literal["gelu", "swish"]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


@dataclasses.dataclass(frozen=True)
class RetNetConfig:
    """A RetNet language model (SPEC sections 1, 4, 5). Defaults follow torchscale 0.3.0.

    Widths: `d_model` is split into `n_heads` key heads of `d_model // n_heads`; `value_dim` (the
    paper's 2d) into value heads of `value_dim // n_heads`.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    value_dim: int = 128
    ffn_dim: int = 128
    chunk_size: int = 512  # default block length of mode="chunkwise"

    # gamma_h schedule, SPEC section 1; "torchscale": official as float32 rounds it (h >= 20: no decay)
    decay: Literal["official", "torchscale", "paper"] = "official"
    ffn: Literal["glu", "plain"] = "glu"  # 0.3.0's GLU or the paper's gelu(x W1) W2
    activation: Activation = "gelu"  # of the FFN
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # block, final and embedding norms
    norm_eps: float = 1e-6
    head_norm: Literal["rmsnorm", "layernorm", "groupnorm"] = "rmsnorm"  # per-head output norm
    head_norm_eps: float = 1e-6
    scale_embedding: bool = False  # multiply embeddings by sqrt(d) (0.3.0: no_scale_embedding=True)
    embedding_norm: bool = False  # 0.3.0's layernorm_embedding
    tie_embeddings: bool = False  # share_decoder_input_output_embed
    deepnorm: bool = False  # DeepNet post-norm blocks, alpha = (2L)**0.25
    # What the backward pass keeps of each block (jax.checkpoint): "projections" keeps the matmul
    # outputs (q, k, v, gate, the retention output, the FFN input projections) and recomputes norms,
    # rotations, decay masks, scores and activations; "none" keeps whatever XLA would; "full" keeps
    # only each block's input and recomputes the block (least memory, ~1/3 more compute).
    remat: Literal["none", "projections", "full"] = "none"
    # Dropout rate on the embeddings and on each residual branch (after retention, after the FFN),
    # as torchscale's `dropout`; applied only when a call passes `dropout_key` (training).
    dropout: float = 0.0
    # Backend-specific code paths (retnet_jax/ops/kernels.py): "auto" picks "xla_cpu" on the CPU
    # backend, "plain" (ordinary autodiff, forward mode too) elsewhere, when a model is built.
    kernels: KernelChoice = "auto"

    dtype: Any = jnp.float32  # compute dtype of activations and matmuls
    param_dtype: Any = jnp.float32  # storage dtype of parameters

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "value_dim", "ffn_dim", "chunk_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("d_model", "value_dim"):
            if getattr(self, name) % self.n_heads:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model // n_heads = {self.d_model // self.n_heads} must be even (pairwise rotation)")
        check_shared_fields(self)

    @property
    def key_head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def value_head_dim(self) -> int:
        return self.value_dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "RetNetConfig":
        """A named configuration with any field overridden, e.g. `preset("tiny", vocab_size=512)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown RetNetConfig fields {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> "RetNetConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (dtypes by name, e.g. "bfloat16")."""
        return {f.name: (getattr(self, f.name).name if f.name in _DTYPE_FIELDS else getattr(self, f.name))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetNetConfig":
        """Inverse of `to_dict`; absent fields take their defaults, unknown fields raise."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown RetNetConfig fields {sorted(unknown)}")
        return cls(**data)  # __post_init__ turns dtype names back into dtypes


_DTYPE_FIELDS = ("dtype", "param_dtype")


def check_shared_fields(cfg) -> None:
    """Checks every model config needs (RetNetConfig, TransformerConfig): the dropout rate, the
    dtypes (stored as `jnp.dtype`), and each `Literal` field's value."""
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be a rate in [0, 1), got {cfg.dropout!r}")
    for name in _DTYPE_FIELDS:
        try:
            object.__setattr__(cfg, name, jnp.dtype(getattr(cfg, name)))
        except TypeError as err:
            raise ValueError(f"{name} must be a dtype such as jnp.bfloat16 or 'float32', "
                             f"got {getattr(cfg, name)!r}") from err
    for name, allowed in literal_choices(type(cfg)).items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")


@functools.cache
def literal_choices(cls) -> dict[str, tuple[Any, ...]]:
    """`{field: allowed values}` for every field of a dataclass annotated with a `Literal`."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


# The paper's models (Table 8): plain gelu FFN, LayerNorm, GroupNorm heads, the paper's decays.
# Its tokenizer is not fixed here: 50,257 (GPT-2 BPE) is used for the size names.
_PAPER = dict(decay="paper", ffn="plain", activation="gelu", norm="layernorm", head_norm="groupnorm",
              vocab_size=50257, chunk_size=512)

_OFFICIAL = dict(ffn="glu", activation="swish", scale_embedding=True, vocab_size=50257, chunk_size=512)

PRESETS: dict[str, dict[str, Any]] = {
    # For tests and the CPU demo: 2 layers, 2 heads of dk=32, dv=64.
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, value_dim=128, ffn_dim=128,
                 chunk_size=16),
    # torchscale's fairseq `retnet_base` / `retnet_medium`: GLU FFN with swish, value and FFN widths
    # about 1.7 d, embeddings scaled by sqrt(d) (fairseq leaves no_scale_embedding False).
    "base": dict(_OFFICIAL, d_model=512, n_layers=6, n_heads=2, value_dim=864, ffn_dim=864),
    "medium": dict(_OFFICIAL, d_model=1024, n_layers=16, n_heads=4, value_dim=1728, ffn_dim=1728),
    "1.3b": dict(_PAPER, d_model=2048, n_layers=24, n_heads=8, value_dim=4096, ffn_dim=4096),
    "2.7b": dict(_PAPER, d_model=2560, n_layers=32, n_heads=10, value_dim=5120, ffn_dim=5120),
    "6.7b": dict(_PAPER, d_model=4096, n_layers=32, n_heads=16, value_dim=8192, ffn_dim=8192),
}
RetNetConfig.PRESETS = PRESETS
