"""Normalisation layers, computed in float32 whatever the activation dtype.

With `kernels="xla_cpu"` the backward passes are written by hand so that every reduction of a product
(`sum(dy * x)` over the features for the input gradient, over the tokens for the scale gradient) is
a contraction (`einsum`): XLA:CPU ran autodiff's fused multiply-then-reduce 8x to 20x slower
(experiments/PERFORMANCE.md). Same function (tested against autodiff in float64), which
`kernels="plain"` uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from retnet_jax.ops.kernels import check_kernels, resolve_kernels
from retnet_jax.ops.state import accumulation_dtype


def _feature_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """`sum(a * b, axis=-1, keepdims=True)` as a contraction."""
    return jnp.einsum("...d,...d->...", a, b)[..., None]


def _token_sum(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """`sum(a * b)` (or `sum(a)`) over every axis but the last, as a contraction: `[..., d] -> [d]`."""
    a2 = a.reshape(-1, a.shape[-1])
    if b is None:
        return jnp.einsum("nd,n->d", a2, jnp.ones(a2.shape[0], a2.dtype))
    return jnp.einsum("nd,nd->d", a2, b.reshape(a2.shape))


def _normalise_fwd_impl(x, centre: bool, eps: float):
    x = x.astype(accumulation_dtype(x.dtype))
    centred = x - jnp.mean(x, axis=-1, keepdims=True) if centre else x
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred * inv_rms, inv_rms


def normalise(x: jax.Array, centre: bool, eps: float, *, kernels: str) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` (`centre`, LayerNorm) or `x / sqrt(mean(x**2) + eps)` (RMSNorm)
    over the last axis, in float32 (at least)."""
    if check_kernels(kernels) == "plain":
        return _normalise_fwd_impl(x, centre, eps)[0]
    return _normalise(x, centre, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _normalise(x: jax.Array, centre: bool, eps: float) -> jax.Array:
    return _normalise_fwd_impl(x, centre, eps)[0]


def _normalise_fwd(x, centre, eps):
    x_hat, inv_rms = _normalise_fwd_impl(x, centre, eps)
    return x_hat, (x_hat, inv_rms, jnp.zeros((0,), x.dtype))


def _normalise_bwd(centre, eps, residuals, dx_hat):
    x_hat, inv_rms, like = residuals
    dx_hat = dx_hat.astype(x_hat.dtype)
    width = x_hat.shape[-1]
    along = dx_hat - x_hat * (_feature_dot(dx_hat, x_hat) / width)
    if centre:
        along = along - jnp.mean(dx_hat, axis=-1, keepdims=True)
    return ((inv_rms * along).astype(like.dtype),)


_normalise.defvjp(_normalise_fwd, _normalise_bwd)


def scale_shift(x_hat: jax.Array, scale: jax.Array, bias: jax.Array | None = None, *,
                kernels: str) -> jax.Array:
    """`x_hat * scale (+ bias)` in float32 (at least); `scale` and `bias` broadcast over the leading
    axes of `x_hat` (their shape is a suffix of its shape)."""
    if check_kernels(kernels) == "plain":
        return _scale_shift_impl(x_hat, scale, bias)
    return _scale_shift(x_hat, scale, bias)


def _scale_shift_impl(x_hat, scale, bias):
    acc = accumulation_dtype(x_hat.dtype)
    y = x_hat.astype(acc) * scale.astype(acc)
    return y if bias is None else y + bias.astype(acc)


@jax.custom_vjp
def _scale_shift(x_hat: jax.Array, scale: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    return _scale_shift_impl(x_hat, scale, bias)


def _scale_shift_fwd(x_hat, scale, bias):
    return _scale_shift(x_hat, scale, bias), (x_hat, scale, bias)


def _scale_shift_bwd(residuals, dy):
    x_hat, scale, bias = residuals
    dy = dy.astype(accumulation_dtype(x_hat.dtype))
    dy_nf = dy.reshape(-1, scale.size)
    dscale = _token_sum(dy_nf, x_hat.reshape(dy_nf.shape).astype(dy.dtype)).reshape(scale.shape)
    dbias = None if bias is None else _token_sum(dy_nf).reshape(bias.shape).astype(bias.dtype)
    dx_hat = (dy * scale.astype(dy.dtype)).astype(x_hat.dtype)
    return dx_hat, dscale.astype(scale.dtype), dbias


_scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


class Norm(nnx.Module):
    """RMSNorm (torchscale 0.3.0: learned scale, no bias) or LayerNorm (scale and bias) over `[..., d]`."""

    def __init__(self, dim: int, kind: str, eps: float, *, dtype, param_dtype, kernels: str):
        self.kind, self.eps, self.dtype, self.kernels = kind, eps, dtype, check_kernels(kernels)
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.bias = (nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("norm",))
                     if kind == "layernorm" else None)

    @classmethod
    def for_model(cls, cfg) -> "Norm":
        """The block/final/embedding norm a `RetNetConfig` asks for."""
        return cls(cfg.d_model, cfg.norm, cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   kernels=resolve_kernels(cfg.kernels))

    def __call__(self, x: jax.Array) -> jax.Array:
        x_hat = normalise(x, self.kind == "layernorm", self.eps, kernels=self.kernels)
        bias = None if self.bias is None else self.bias[...]
        return scale_shift(x_hat, self.scale[...], bias, kernels=self.kernels).astype(self.dtype)


class HeadNorm(nnx.Module):
    """Normalise each head's `dv` outputs separately (never across time, SPEC section 8).

    "rmsnorm": torchscale 0.3.0 (no affine); "layernorm": the first code release (no affine);
    "groupnorm": the paper's GroupNorm with one group per head and a per-channel affine.
    """

    def __init__(self, heads: int, head_dim: int, kind: str, eps: float, *, param_dtype, kernels: str):
        self.kind, self.eps, self.kernels = kind, eps, check_kernels(kernels)
        if kind == "groupnorm":
            axes = ("norm_heads", "norm")  # small: replicated, each device reads its heads' rows
            self.scale = nnx.Param(jnp.ones((heads, head_dim), param_dtype), logical_axes=axes)
            self.bias = nnx.Param(jnp.zeros((heads, head_dim), param_dtype), logical_axes=axes)

    def __call__(self, o_bthv: jax.Array) -> jax.Array:
        """`[B, T, H, dv]` -> float32 `[B, T, H, dv]`."""
        y = normalise(o_bthv, self.kind != "rmsnorm", self.eps, kernels=self.kernels)
        if self.kind == "groupnorm":
            y = scale_shift(y, self.scale[...], self.bias[...], kernels=self.kernels)
        return y
