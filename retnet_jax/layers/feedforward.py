"""The feed-forward network: torchscale 0.3.0's GLU or the paper's plain `gelu(x W1) W2`."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from retnet_jax.config import RetNetConfig
from retnet_jax.layers.fused import fused_projection
from retnet_jax.layers.gated_projection import gated_projection
from retnet_jax.layers.initializers import stacked, torch_linear_default
from retnet_jax.ops.kernels import resolve_kernels
from retnet_jax.sharding import constrain


class FeedForward(nnx.Module):
    """GLU: `fc2(act(x fc1) * (x gate))`; plain: `fc2(act(x fc1))`. No biases.

    `in_proj [d, 2, ffn]` holds fc1 then gate (GLU) or `[d, 1, ffn]` (plain); `out_proj [ffn, d]`.
    Under tensor parallelism both are split by hidden unit (`ffn`).
    """

    def __init__(self, cfg: RetNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernels = resolve_kernels(cfg.kernels)
        d, f, pd = cfg.d_model, cfg.ffn_dim, cfg.param_dtype
        n_in = 2 if cfg.ffn == "glu" else 1
        self.in_proj = nnx.Param(stacked(rngs.params(), n_in, lambda k: torch_linear_default(
            k, d, (d, f), pd)), logical_axes=("embed", "pieces", "mlp"))
        self.out_proj = nnx.Param(torch_linear_default(rngs.params(), f, (f, d), pd),
                                  logical_axes=("mlp", "embed"))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.cfg
        pieces = fused_projection(x_btd, self.in_proj[...], (1,) * self.in_proj.shape[1], axis=-2,
                                  dtype=cfg.dtype, kernels=self.kernels)
        projected = checkpoint_name(tuple(constrain(p[..., 0, :], ("batch", "length", "mlp"))
                                          for p in pieces), "ffn_in")
        x_btf, gate_btf = projected if len(projected) == 2 else (projected[0], None)
        # fc2(act(x fc1) * (x gate)), or fc2(act(x fc1))
        y_btd = gated_projection(cfg.activation, x_btf, gate_btf, self.out_proj[...], cfg.dtype,
                                 kernels=self.kernels)
        return constrain(y_btd, ("batch", "length", "embed"))
