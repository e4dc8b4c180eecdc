"""`TransformerConfig`: the Transformer baseline's configuration, derived from a `RetNetConfig`.

The paper compares RetNet with a Transformer of the same size: same width, depth, vocabulary,
heads, norms, FFN kind and dtypes, and an FFN widened until the parameter counts match.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from retnet_jax.config import RetNetConfig, check_shared_fields
from retnet_jax.model import RetNet
from retnet_jax.ops.kernels import KernelChoice

# Matched FFN widths are rounded to a multiple of this (divisible by tensor-parallel degrees up to 8).
FFN_MULTIPLE = 8
SIZE_TOLERANCE = 0.02  # the matched Transformer's parameter count is within 2% of the RetNet's


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """A pre-norm decoder-only Transformer with rotary positions (RetNet's pairwise rotation).

    Field names and meanings are `RetNetConfig`'s, so the shared layers (`Norm.for_model`,
    `FeedForward`) read either config. Heads have width `d_model // n_heads`.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_dim: int = 256

    ffn: Literal["glu", "plain"] = "glu"
    activation: Literal["gelu", "swish"] = "gelu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    scale_embedding: bool = False
    embedding_norm: bool = False
    tie_embeddings: bool = False
    deepnorm: bool = False  # DeepNet post-norm blocks, as RetNet's
    remat: Literal["none", "projections", "full"] = "none"
    dropout: float = 0.0  # on the embeddings and each residual branch, when a call passes dropout_key
    kernels: KernelChoice = "auto"  # retnet_jax/ops/kernels.py

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"d_model // n_heads = {self.head_dim} must be even (pairwise rotation)")
        check_shared_fields(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_retnet(cls, cfg: RetNetConfig, ffn_dim: int | None = None) -> "TransformerConfig":
        """The Transformer the paper compares `cfg` with: every shared field copied, and an FFN of
        `ffn_dim` or, when None, as wide as makes the parameter count match the RetNet's (2%)."""
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        tcfg = cls(**{**shared, "ffn_dim": cfg.ffn_dim if ffn_dim is None else ffn_dim})
        return tcfg if ffn_dim is not None else tcfg.replace(ffn_dim=matched_ffn_dim(tcfg, cfg))

    @property
    def parameter_count(self) -> int:
        """Number of parameters of `Transformer(self)` (tested against the built model)."""
        d, norm = self.d_model, self.d_model * (2 if self.norm == "layernorm" else 1)
        ffn_matrices = 3 if self.ffn == "glu" else 2
        block = 3 * d * d + d * d + ffn_matrices * d * self.ffn_dim + 2 * norm  # qkv, out, FFN, norms
        tables = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return tables + self.n_layers * block + norm * (int(self.embedding_norm) + int(not self.deepnorm))


def parameter_count(module_cls, cfg) -> int:
    """Parameters of `module_cls(cfg, rngs=...)`, from shapes alone (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def matched_ffn_dim(tcfg: TransformerConfig, cfg: RetNetConfig) -> int:
    """The FFN width (a multiple of `FFN_MULTIPLE` where that stays within `SIZE_TOLERANCE`) that
    gives `tcfg` the parameter count of `RetNet(cfg)`: the count is linear in the width."""
    target = parameter_count(RetNet, cfg)
    base = tcfg.replace(ffn_dim=1).parameter_count
    per_unit = tcfg.replace(ffn_dim=2).parameter_count - base
    exact = (target - base) / per_unit + 1
    for width in (FFN_MULTIPLE * round(exact / FFN_MULTIPLE), round(exact)):
        if width >= 1 and abs(tcfg.replace(ffn_dim=width).parameter_count - target) <= (
                SIZE_TOLERANCE * target):
            return width
    raise ValueError(f"no FFN width matches the RetNet's {target} parameters within "
                     f"{SIZE_TOLERANCE:.0%} (attention and embeddings alone differ too much); pass ffn_dim")

