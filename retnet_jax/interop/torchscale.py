"""torchscale 0.3.0 RetNet <-> retnet_jax: configuration, weights and converted checkpoints.

- `torchscale_config(args)` maps a torchscale `RetNetConfig` (or a dict of its arguments) to a
  `RetNetConfig`; `torchscale_args(cfg)` is the way back (keyword arguments for torchscale's
  `RetNetConfig`).
- `load_torchscale(state_dict_or_path, args)` builds a `RetNet` from a `RetNetDecoder` state dict
  (with its `embed_tokens` and `output_projection`); `to_torchscale(model)` gives the state dict back,
  with the same keys, shapes and dtypes as `RetNetDecoder.state_dict()` (rel-pos buffers included).
  float32 (and bf16) weights survive the round trip bit for bit.
- `save_converted(model, outdir)` / `load_converted(outdir)`: an orbax checkpoint of the parameters
  plus `config.json` (what `retnet-jax convert-torchscale` writes).

Every correspondence between a torchscale key and a retnet_jax parameter is one row of `PARAM_MAP`:
if the model's parameter layout changes, that table is the only place to update.

torch is imported lazily (only to read files and to build tensors); torchscale is never imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax.config import RetNetConfig
from retnet_jax.model import RetNet
from retnet_jax.ops import log_decay, rotation_frequencies

# ----------------------------------------------------------------------------------------------
# The mapping table
# ----------------------------------------------------------------------------------------------


class ParamMapping(NamedTuple):
    """One torchscale tensor <-> (a region of) one retnet_jax parameter.

    ours: path of the parameter in `nnx.state(model, nnx.Param)`.
    theirs: the torchscale state-dict key; `{i}` marks a per-layer key, whose parameter carries a
      leading layer axis on our side (the blocks are stacked with `nnx.vmap`).
    region: for fused kernels, `region(cfg)` indexes the part of the (per-layer) parameter this
      tensor fills, e.g. the q columns of `qkvg_proj [d, H, 2dk + 2dv]`.
    transpose: torch `Linear.weight` is `[out, in]`; our kernels are `[in..., out...]`, the input
      being the first `in_axes` axes of the region.
    """

    ours: tuple[str, ...]
    theirs: str
    region: Callable[[RetNetConfig], tuple] | None = None
    transpose: bool = False
    in_axes: int = 1


def _qkvg(piece: int) -> Callable[[RetNetConfig], tuple]:
    """The columns of q, k, v or g (piece 0-3) in every head of `qkvg_proj [d, H, 2dk + 2dv]`."""
    def region(cfg: RetNetConfig) -> tuple:
        widths = (cfg.key_head_dim,) * 2 + (cfg.value_head_dim,) * 2
        start = sum(widths[:piece])
        return (slice(None), slice(None), slice(start, start + widths[piece]))
    return region


def _ffn(piece: int) -> Callable[[RetNetConfig], tuple]:
    """fc1 (0) or gate (1) of `in_proj [d, 2, ffn]`."""
    return lambda cfg: (slice(None), piece)


# In torchscale's state_dict order. Rows whose parameter the model does not have (embed_norm without
# layernorm_embedding, final_norm under deepnorm, unembed when tied) are skipped.
PARAM_MAP: tuple[ParamMapping, ...] = (
    ParamMapping(("embed",), "embed_tokens.weight"),
    ParamMapping(("unembed",), "output_projection.weight"),  # both [vocab, d]
    ParamMapping(("embed_norm", "scale"), "layernorm_embedding.weight"),
    ParamMapping(("blocks", "retention", "qkvg_proj"), "layers.{i}.retention.q_proj.weight", _qkvg(0), True),
    ParamMapping(("blocks", "retention", "qkvg_proj"), "layers.{i}.retention.k_proj.weight", _qkvg(1), True),
    ParamMapping(("blocks", "retention", "qkvg_proj"), "layers.{i}.retention.v_proj.weight", _qkvg(2), True),
    ParamMapping(("blocks", "retention", "qkvg_proj"), "layers.{i}.retention.g_proj.weight", _qkvg(3), True),
    ParamMapping(("blocks", "retention", "out_proj"), "layers.{i}.retention.out_proj.weight",
                 transpose=True, in_axes=2),
    ParamMapping(("blocks", "retention_norm", "scale"), "layers.{i}.retention_layer_norm.weight"),
    ParamMapping(("blocks", "ffn", "in_proj"), "layers.{i}.ffn.fc1.weight", _ffn(0), True),
    ParamMapping(("blocks", "ffn", "out_proj"), "layers.{i}.ffn.fc2.weight", transpose=True),
    ParamMapping(("blocks", "ffn", "in_proj"), "layers.{i}.ffn.gate.weight", _ffn(1), True),
    ParamMapping(("blocks", "ffn_norm", "scale"), "layers.{i}.final_layer_norm.weight"),
    ParamMapping(("final_norm", "scale"), "layer_norm.weight"),
)

# With tied embeddings torchscale's state_dict repeats the embedding under this key (same storage).
TIED_KEY, TIED_SOURCE = "output_projection.weight", "embed_tokens.weight"
# Persistent buffers of `RetNetRelPos`: derived from the config, checked on load, produced on save.
ANGLE_KEY, DECAY_KEY = "retnet_rel_pos.angle", "retnet_rel_pos.decay"
# torchscale's `gamma_h = 1 - 2**(-5 - h)` is computed in float32, where it rounds to exactly 1 for
# h >= 20: models with more heads convert with decay="torchscale", which reproduces that rounding.
ROUNDED_HEADS = 20

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

# torchscale 0.3.0 `RetNetConfig` defaults of every field read here (architecture/config.py).
TORCHSCALE_DEFAULTS: dict[str, Any] = {
    "decoder_embed_dim": 768,
    "decoder_value_embed_dim": 1280,
    "decoder_retention_heads": 3,
    "decoder_ffn_embed_dim": 1280,
    "decoder_layers": 12,
    "decoder_normalize_before": True,
    "activation_fn": "gelu",
    "dropout": 0.0,
    "activation_dropout": 0.0,
    "drop_path_rate": 0.0,
    "no_scale_embedding": True,
    "layernorm_embedding": False,
    "moe_freq": 0,
    "use_xmoe": False,
    "deepnorm": False,
    "subln": True,
    "multiway": False,
    "share_decoder_input_output_embed": False,
    "no_output_layer": False,
    "layernorm_eps": 1e-6,
    "chunkwise_recurrent": False,
    "recurrent_chunk_size": 512,
    "vocab_size": -1,
}

# Every keyword torchscale 0.3.0's RetNetConfig accepts (others are silently ignored by it).
TORCHSCALE_FIELDS = frozenset(TORCHSCALE_DEFAULTS) | {
    "moe_expert_count", "moe_top1_expert", "moe_gating_use_fp32", "moe_eval_capacity_token_fraction",
    "moe_second_expert_policy", "moe_normalize_gate_prob_before_dropping", "rel_pos_buckets",
    "max_rel_pos", "max_target_positions", "checkpoint_activations", "fsdp", "ddp_rank",
    "xpos_rel_pos", "xpos_scale_base",
}

_ACTIVATIONS = {"gelu": "gelu", "swish": "swish"}  # torchscale activation_fn -> ours


def _read_args(args) -> dict[str, Any]:
    """The effective torchscale settings of a `RetNetConfig`-like object or a dict of its kwargs.

    A dict is read as `RetNetConfig(**args)` would: defaults for absent keys, unknown keys ignored,
    then torchscale's post-processing (`deepnorm` forces post-norm and clears `subln`; `subln`,
    True by default, forces pre-norm and clears `deepnorm`). An object is read as it is (the
    post-processing ran in its `__init__`, and `RetNetDecoder` reads the attributes as they are,
    also after `override()`); missing attributes take the defaults.
    """
    if isinstance(args, Mapping):
        unknown = sorted(str(k) for k in args if k not in TORCHSCALE_FIELDS)
        if unknown:
            warnings.warn(f"ignored (not torchscale RetNetConfig fields): {unknown}", stacklevel=3)
        out = {**TORCHSCALE_DEFAULTS, **{k: v for k, v in args.items() if k in TORCHSCALE_DEFAULTS}}
        if out["deepnorm"]:
            out["decoder_normalize_before"], out["subln"] = False, False
        if out["subln"]:
            out["decoder_normalize_before"], out["deepnorm"] = True, False
        return out
    if args is None:
        raise ValueError("torchscale args are required: a torchscale RetNetConfig or a dict of its kwargs")
    return {k: getattr(args, k, v) for k, v in TORCHSCALE_DEFAULTS.items()}


def torchscale_config(args, *, vocab_size: int | None = None, **overrides) -> RetNetConfig:
    """The `RetNetConfig` of the model torchscale 0.3.0 builds from `args`.

    Args:
      args: a torchscale `RetNetConfig` (or any object with its attributes, e.g. fairseq args), or a
        dict of its keyword arguments (read as `RetNetConfig(**args)` would, see `_read_args`).
      vocab_size: the vocabulary size when `args.vocab_size` is not set (torchscale's default is -1;
        the embedding is passed in separately): `load_torchscale` takes it from `embed_tokens`.
      overrides: any other `RetNetConfig` field (e.g. `param_dtype=jnp.bfloat16`, `chunk_size`).

    torchscale 0.3.0 is RMSNorm everywhere (eps `layernorm_eps`, also in the per-head norm), a GLU
    FFN, the official decays. Raises ValueError, listing every reason, for what retnet_jax cannot
    express: activations other than gelu and swish, multiway, MoE, `no_output_layer`, post-norm
    without deepnorm, deepnorm with pre-norm, more than 20 heads.
    """
    a = _read_args(args)
    problems = []
    activation = _ACTIVATIONS.get(a["activation_fn"])
    if activation is None:
        problems.append(f"activation_fn={a['activation_fn']!r} (supported: {sorted(_ACTIVATIONS)})")
    if a["multiway"]:
        problems.append("multiway=True (multiway q/k/v/g/out projections)")
    if a["moe_freq"] or a["use_xmoe"]:
        problems.append(f"mixture-of-experts layers (moe_freq={a['moe_freq']}, use_xmoe={a['use_xmoe']})")
    if a["no_output_layer"]:
        problems.append("no_output_layer=True (retnet_jax always has an output projection)")
    if a["deepnorm"] and a["decoder_normalize_before"]:
        problems.append("deepnorm=True with decoder_normalize_before=True (pre-norm blocks with "
                        "DeepNet's residual scale; retnet_jax's deepnorm is post-norm)")
    if not a["deepnorm"] and not a["decoder_normalize_before"]:
        problems.append("decoder_normalize_before=False without deepnorm (plain post-norm blocks)")
    heads = a["decoder_retention_heads"]
    if vocab_size is None:
        vocab_size = a["vocab_size"]
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        problems.append(f"vocab_size={vocab_size!r}: set args.vocab_size or pass vocab_size= "
                        "(load_torchscale takes it from embed_tokens.weight)")
    if problems:
        raise ValueError("torchscale configuration not supported by retnet_jax:\n  - "
                         + "\n  - ".join(problems))
    eps = float(a["layernorm_eps"])
    fields = dict(
        vocab_size=vocab_size,
        d_model=a["decoder_embed_dim"],
        n_layers=a["decoder_layers"],
        n_heads=heads,
        value_dim=a["decoder_value_embed_dim"],
        ffn_dim=a["decoder_ffn_embed_dim"],
        chunk_size=a["recurrent_chunk_size"] or TORCHSCALE_DEFAULTS["recurrent_chunk_size"],
        decay="torchscale" if isinstance(heads, int) and heads > ROUNDED_HEADS else "official",
        ffn="glu",
        activation=activation,
        norm="rmsnorm",
        norm_eps=eps,
        head_norm="rmsnorm",
        head_norm_eps=eps,
        scale_embedding=not a["no_scale_embedding"],
        embedding_norm=bool(a["layernorm_embedding"]),
        tie_embeddings=bool(a["share_decoder_input_output_embed"]),
        deepnorm=bool(a["deepnorm"]),
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(RetNetConfig)}
    if unknown:
        raise ValueError(f"unknown RetNetConfig fields {sorted(unknown)}")
    return RetNetConfig(**{**fields, **overrides})


def torchscale_args(cfg: RetNetConfig) -> dict[str, Any]:
    """Keyword arguments of torchscale's `RetNetConfig` for the same model as `cfg` (inference:
    dropouts 0). Raises ValueError for what torchscale 0.3.0 cannot express."""
    problems = []
    for name, want in (("ffn", "glu"), ("norm", "rmsnorm"), ("head_norm", "rmsnorm")):
        if getattr(cfg, name) != want:
            problems.append(f"{name}={getattr(cfg, name)!r} (torchscale 0.3.0: {want!r})")
    # The two schedules coincide up to 20 heads; beyond, only the float32-rounded one is torchscale's.
    if cfg.decay == "paper" or (cfg.decay == "official" and cfg.n_heads > ROUNDED_HEADS):
        problems.append(f"decay={cfg.decay!r} with {cfg.n_heads} heads (torchscale 0.3.0: 'torchscale', "
                        "gamma_h = 1 - 2**(-5-h) rounded to float32)")
    if cfg.norm_eps != cfg.head_norm_eps:
        problems.append(f"norm_eps={cfg.norm_eps} != head_norm_eps={cfg.head_norm_eps} "
                        "(torchscale uses layernorm_eps for both)")
    if problems:
        raise ValueError("RetNetConfig not expressible in torchscale 0.3.0:\n  - " + "\n  - ".join(problems))
    return dict(
        decoder_embed_dim=cfg.d_model,
        decoder_value_embed_dim=cfg.value_dim,
        decoder_retention_heads=cfg.n_heads,
        decoder_ffn_embed_dim=cfg.ffn_dim,
        decoder_layers=cfg.n_layers,
        decoder_normalize_before=not cfg.deepnorm,
        activation_fn=cfg.activation,
        dropout=0.0,
        activation_dropout=0.0,
        drop_path_rate=0.0,
        no_scale_embedding=not cfg.scale_embedding,
        layernorm_embedding=cfg.embedding_norm,
        deepnorm=cfg.deepnorm,
        subln=not cfg.deepnorm,
        share_decoder_input_output_embed=cfg.tie_embeddings,
        layernorm_eps=cfg.norm_eps,
        recurrent_chunk_size=cfg.chunk_size,
        vocab_size=cfg.vocab_size,
    )


def infer_torchscale_args(state_dict) -> dict[str, Any]:
    """The torchscale arguments a state dict's keys and shapes determine.

    Widths, depth, vocabulary, heads (from the `retnet_rel_pos` buffers), `layernorm_embedding`
    (its key), `deepnorm` (no final `layer_norm.weight`) and tying (no `output_projection.weight`,
    or one equal to the embedding). NOT determined by the weights: `activation_fn`,
    `no_scale_embedding`, `layernorm_eps`, `recurrent_chunk_size` (left out: give them yourself).
    """
    sd = _normalise_state_dict(state_dict)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    problems = []
    if "embed_tokens.weight" not in shapes:
        raise ValueError("cannot infer torchscale args: no embed_tokens.weight in the state dict")
    vocab, d = shapes["embed_tokens.weight"]
    layer_ids = {int(k.split(".")[1]) for k in shapes
                 if k.startswith("layers.") and k.split(".")[1].isdigit()}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    out = dict(decoder_embed_dim=d, vocab_size=vocab, decoder_layers=n_layers)
    if "layers.0.retention.v_proj.weight" in shapes:
        out["decoder_value_embed_dim"] = shapes["layers.0.retention.v_proj.weight"][0]
    else:
        problems.append("layers.0.retention.v_proj.weight")
    if "layers.0.ffn.fc1.weight" in shapes:
        out["decoder_ffn_embed_dim"] = shapes["layers.0.ffn.fc1.weight"][0]
    else:
        problems.append("layers.0.ffn.fc1.weight")
    if DECAY_KEY in shapes:
        out["decoder_retention_heads"] = shapes[DECAY_KEY][0]
    elif ANGLE_KEY in shapes and shapes[ANGLE_KEY][0]:
        out["decoder_retention_heads"] = d // shapes[ANGLE_KEY][0]
    else:
        problems.append(f"{DECAY_KEY} or {ANGLE_KEY} (the head count)")
    if problems:
        raise ValueError("cannot infer torchscale args: the state dict lacks " + ", ".join(problems))
    out["layernorm_embedding"] = "layernorm_embedding.weight" in shapes
    out["deepnorm"] = "layer_norm.weight" not in shapes
    out["subln"] = not out["deepnorm"]
    tied = TIED_KEY not in sd or (
        shapes[TIED_KEY] == shapes[TIED_SOURCE]
        and np.array_equal(_to_numpy(sd[TIED_KEY]), _to_numpy(sd[TIED_SOURCE])))
    out["share_decoder_input_output_embed"] = bool(tied)
    return out


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------

_FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("torch is needed to read or produce torchscale tensors: "
                          "pip install torch (CPU build is enough)") from err
    return torch


def _to_numpy(x) -> np.ndarray:
    """A torch tensor (bf16 included: exactly, via float32), numpy or jax array as numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor
        torch = _torch()
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            return x.float().numpy()
        return x.numpy()
    return np.asarray(x)


def _dtype_name(x) -> str:
    """"float32", "bfloat16", ... of a torch tensor or an array."""
    dtype = getattr(x, "dtype", None)
    return str(dtype).removeprefix("torch.")


def _to_torch(x: np.ndarray, dtype_name: str):
    torch = _torch()
    tensor = torch.from_numpy(np.array(x, dtype=np.float32 if dtype_name != "float64" else np.float64))
    return tensor.to(getattr(torch, dtype_name))


# ----------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------


def _read_file(path) -> Mapping:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    torch = _torch()
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled objects (e.g. fairseq's cfg/args)
        raise ValueError(
            f"could not load {path} with torch.load(weights_only=True): {err}\n"
            "Only tensors, plain containers and numbers can be read (arbitrary pickled objects are "
            "never unpickled). Re-save just the model state dict: torch.save(ckpt['model'], path)."
        ) from err


def _normalise_state_dict(obj) -> dict[str, Any]:
    """Unwrap a fairseq-style checkpoint (`{"model": state_dict, ...}`) and strip `decoder.`."""
    if isinstance(obj, (str, os.PathLike)):
        obj = _read_file(obj)
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (mapping of names to tensors) or a path, got {type(obj)}")
    if "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = key.removeprefix("decoder.")
        if name in out:
            raise ValueError(f"state dict holds {name!r} both with and without the 'decoder.' prefix")
        out[name] = value
    return out


def _abstract_model(cfg: RetNetConfig):
    """(graphdef, abstract Param state, concrete non-Param state) without materialising weights."""
    graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: RetNet(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)

    @jax.jit
    def constants():  # non-parameter variables derived from cfg (if any); the weights are DCE'd
        return nnx.state(RetNet(cfg, rngs=nnx.Rngs(0)), nnx.Not(nnx.Param))

    return graphdef, params, constants()


def _layered(row: ParamMapping) -> bool:
    """Per-layer rows name a stacked parameter with a leading layer axis."""
    return "{i}" in row.theirs


def _region(row: ParamMapping, cfg: RetNetConfig) -> tuple:
    return () if row.region is None else row.region(cfg)


def _rows(cfg: RetNetConfig, param_shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[ParamMapping]:
    """The rows of PARAM_MAP that apply to a model, after checking that they cover each of its
    parameters exactly once."""
    rows = [row for row in PARAM_MAP if row.ours in param_shapes]
    for path, shape in param_shapes.items():
        mine = [row for row in rows if row.ours == path]
        layered = {_layered(row) for row in mine}
        covered = np.zeros(shape[1:] if layered == {True} else shape, np.int8)
        for row in mine:
            covered[_region(row, cfg)] += 1
        if len(layered) != 1 or not np.all(covered == 1):
            raise RuntimeError(f"PARAM_MAP does not cover parameter {'.'.join(path)} {shape} exactly: "
                               "the parameter layout changed; update PARAM_MAP")
    return rows


def _region_shape(row: ParamMapping, cfg: RetNetConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our shape of the region `row` fills (layer axis excluded)."""
    shape = shape[1:] if _layered(row) else shape
    return np.empty(shape, np.int8)[_region(row, cfg)].shape


def _torch_shape(row: ParamMapping, cfg: RetNetConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torchscale tensor shape of `row` given our parameter shape."""
    region = _region_shape(row, cfg, shape)
    if not row.transpose:
        return tuple(region)
    return (math.prod(region[row.in_axes:]), math.prod(region[:row.in_axes]))


def _keys(row: ParamMapping, n_layers: int) -> list[tuple[int | None, str]]:
    if _layered(row):
        return [(i, row.theirs.format(i=i)) for i in range(n_layers)]
    return [(None, row.theirs)]


def _expected(cfg: RetNetConfig, param_shapes) -> dict[str, tuple[int, ...]]:
    """Every torchscale key of this model with its shape, in torchscale's state_dict order
    (per-layer keys layer-major), rel-pos buffers last."""
    rows = _rows(cfg, param_shapes)
    out: dict[str, tuple[int, ...]] = {}
    i = 0
    while i < len(rows):
        if not _layered(rows[i]):
            out[rows[i].theirs] = _torch_shape(rows[i], cfg, param_shapes[rows[i].ours])
            if cfg.tie_embeddings and rows[i].theirs == TIED_SOURCE:
                out[TIED_KEY] = out[TIED_SOURCE]
            i += 1
            continue
        j = i
        while j < len(rows) and _layered(rows[j]):
            j += 1
        for layer in range(cfg.n_layers):
            for row in rows[i:j]:
                out[row.theirs.format(i=layer)] = _torch_shape(row, cfg, param_shapes[row.ours])
        i = j
    out[ANGLE_KEY] = (cfg.key_head_dim,)
    out[DECAY_KEY] = (cfg.n_heads,)
    return out


def _torchscale_buffers(cfg: RetNetConfig) -> dict[str, np.ndarray]:
    """`RetNetRelPos`'s angle and decay buffers exactly as torchscale computes them (float32 torch)."""
    torch = _torch()
    angle = 1.0 / (10000 ** torch.linspace(0, 1, cfg.d_model // cfg.n_heads // 2))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()
    decay = torch.log(1 - 2 ** (-5 - torch.arange(cfg.n_heads, dtype=torch.float)))
    return {ANGLE_KEY: angle, DECAY_KEY: decay}


_BUFFER_RTOL = {"bfloat16": 2.0**-7, "float16": 2.0**-10}


def _check_buffers(sd: Mapping, cfg: RetNetConfig) -> None:
    """The checkpoint's rel-pos buffers must be what retnet_jax derives from the config."""
    ours = {
        ANGLE_KEY: np.repeat(rotation_frequencies(cfg.key_head_dim), 2),
        DECAY_KEY: log_decay(cfg.n_heads, cfg.decay),
    }
    bad = []
    for key, want in ours.items():
        if key in sd:
            got = _to_numpy(sd[key]).astype(np.float64)
            rtol = _BUFFER_RTOL.get(_dtype_name(sd[key]), 1e-5)  # stored in a half type: its rounding
            if not np.allclose(got, want, rtol=rtol, atol=0.0):
                bad.append(f"{key}: checkpoint {np.array2string(got, precision=6, threshold=8)}, "
                           f"retnet_jax {np.array2string(want.astype(np.float64), precision=6, threshold=8)}")
    if bad:
        raise ValueError("the checkpoint's rotation/decay buffers differ from torchscale 0.3.0's (a "
                         "modified RetNetRelPos?), which retnet_jax derives from the config:\n  "
                         + "\n  ".join(bad))


def _check_keys(sd: Mapping, cfg: RetNetConfig, expected: Mapping[str, tuple[int, ...]]) -> None:
    optional = {ANGLE_KEY, DECAY_KEY} | ({TIED_KEY} if cfg.tie_embeddings else set())
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = sorted(k for k in sd if k not in expected)
    shapes = [f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}"
              for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("wrongly shaped keys", shapes)):
        if items:
            problems.append(f"{title} ({len(items)}):\n    " + "\n    ".join(items))
    if problems:
        summary = (f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, n_layers={cfg.n_layers}, "
                   f"n_heads={cfg.n_heads}, value_dim={cfg.value_dim}, ffn_dim={cfg.ffn_dim}, "
                   f"embedding_norm={cfg.embedding_norm}, tie_embeddings={cfg.tie_embeddings}, "
                   f"deepnorm={cfg.deepnorm}")
        raise ValueError(f"torchscale state dict does not match the configuration ({summary}):\n  "
                         + "\n  ".join(problems))
    if cfg.tie_embeddings and TIED_KEY in sd and not np.array_equal(
            _to_numpy(sd[TIED_KEY]), _to_numpy(sd[TIED_SOURCE])):
        raise ValueError(f"share_decoder_input_output_embed=True but {TIED_KEY} differs from "
                         f"{TIED_SOURCE}; load it with share_decoder_input_output_embed=False")


def _common_dtype(sd: Mapping, keys) -> str:
    names = {_dtype_name(sd[k]) for k in keys}
    return names.pop() if len(names) == 1 else "float32"


def load_torchscale(
    state_dict_or_path, torchscale_args=None, *, param_dtype=None, **overrides
) -> tuple[RetNetConfig, RetNet]:
    """Build a `RetNet` holding the weights of a torchscale 0.3.0 `RetNetDecoder`.

    Args:
      state_dict_or_path: `RetNetDecoder.state_dict()` (embed_tokens and output_projection
        included; tied checkpoints may hold only `embed_tokens.weight`), a fairseq-style checkpoint
        dict with a "model" key (a leading "decoder." is stripped from keys), or a file path: read
        with safetensors for `.safetensors`, else `torch.load(map_location="cpu", weights_only=True)`
        (never arbitrary unpickling). The `retnet_rel_pos` buffers are optional; when present they
        must equal what the config implies.
      torchscale_args: the torchscale `RetNetConfig` (or dict of its kwargs) the model was built
        with. vocab_size defaults to `embed_tokens.weight.shape[0]`. None: infer what the weights
        determine (`infer_torchscale_args`) and take torchscale's defaults for the rest, with a
        warning (activation "gelu", no_scale_embedding=True, layernorm_eps 1e-6).
      param_dtype: storage dtype of the parameters; default the checkpoint's (float32, bfloat16 or
        float16), float32 otherwise.
      overrides: other `RetNetConfig` fields (e.g. `dtype=jnp.bfloat16`, `chunk_size=256`).

    Returns `(cfg, model)`. Raises ValueError listing all missing, unexpected and wrongly shaped
    keys at once.
    """
    sd = _normalise_state_dict(state_dict_or_path)
    if torchscale_args is None:
        torchscale_args = infer_torchscale_args(sd)
        warnings.warn(
            "torchscale args inferred from the weights; activation_fn, no_scale_embedding, "
            "layernorm_eps and recurrent_chunk_size take torchscale's defaults (gelu, True, 1e-6, "
            "512): pass the model's args if it was trained otherwise", stacklevel=2)
    embed = sd.get(TIED_SOURCE)
    args_vocab = (torchscale_args.get("vocab_size", -1) if isinstance(torchscale_args, Mapping)
                  else getattr(torchscale_args, "vocab_size", -1))
    vocab = args_vocab if isinstance(args_vocab, int) and args_vocab > 0 else (
        int(embed.shape[0]) if embed is not None and len(embed.shape) == 2 else None)
    param_keys = [k for k in sd if k not in (ANGLE_KEY, DECAY_KEY)]
    if param_dtype is None:
        name = _common_dtype(sd, param_keys) if param_keys else "float32"
        param_dtype = _FLOAT_DTYPES.get(name, jnp.float32)
    cfg = torchscale_config(torchscale_args, vocab_size=vocab, param_dtype=param_dtype, **overrides)

    graphdef, params, constants = _abstract_model(cfg)
    flat = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(params)}
    param_shapes = {path: tuple(leaf.shape) for path, leaf in flat.items()}
    expected = _expected(cfg, param_shapes)
    _check_keys(sd, cfg, expected)
    _check_buffers(sd, cfg)

    arrays = {path: np.empty(shape, np.float32) for path, shape in param_shapes.items()}
    for row in _rows(cfg, param_shapes):
        for layer, key in _keys(row, cfg.n_layers):
            value = _to_numpy(sd[key]).astype(np.float32)
            value = value.T if row.transpose else value
            target = arrays[row.ours] if layer is None else arrays[row.ours][layer]
            region = _region(row, cfg)
            target[region] = value.reshape(target[region].shape)
    pure = nnx.to_pure_dict(params)
    for path, array in arrays.items():
        node = pure
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = jnp.asarray(array, dtype=flat[path].dtype)
    nnx.replace_by_pure_dict(params, pure)
    return cfg, nnx.merge(graphdef, params, constants)


def to_torchscale(model: RetNet) -> dict[str, Any]:
    """The torchscale 0.3.0 `RetNetDecoder.state_dict()` of `model`: same keys (in the same order),
    shapes and dtypes, the `retnet_rel_pos` buffers included (computed exactly as torchscale does).

    With tied embeddings `output_projection.weight` is the same tensor as `embed_tokens.weight`, as
    in torchscale (use `safetensors.torch.save_model`-style de-duplication to write safetensors).
    Load into torchscale with `RetNetDecoder(RetNetConfig(**torchscale_args(model.cfg)),
    embed_tokens=torch.nn.Embedding(V, d)).load_state_dict(sd)`.
    """
    cfg = model.cfg
    torchscale_args(cfg)  # raises if torchscale cannot express the model
    flat = {tuple(path): np.asarray(jax.device_get(var[...]))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    param_shapes = {path: tuple(a.shape) for path, a in flat.items()}
    expected = _expected(cfg, param_shapes)
    dtype_name = jnp.dtype(cfg.param_dtype).name
    tensors: dict[str, Any] = {}
    for row in _rows(cfg, param_shapes):
        for layer, key in _keys(row, cfg.n_layers):
            value = flat[row.ours] if layer is None else flat[row.ours][layer]
            value = value[_region(row, cfg)]
            if row.transpose:
                value = value.reshape(math.prod(value.shape[:row.in_axes]), -1).T
            tensors[key] = _to_torch(np.ascontiguousarray(value), dtype_name)
    if cfg.tie_embeddings:
        tensors[TIED_KEY] = tensors[TIED_SOURCE]
    for key, buffer in _torchscale_buffers(cfg).items():
        tensors[key] = buffer.to(tensors[TIED_SOURCE].dtype)
    missing = set(expected) ^ set(tensors)
    if missing:  # pragma: no cover - an inconsistency of PARAM_MAP
        raise RuntimeError(f"PARAM_MAP produced an incomplete state dict: {sorted(missing)}")
    return {key: tensors[key] for key in expected}


# ----------------------------------------------------------------------------------------------
# Converted checkpoints (orbax parameters + config.json)
# ----------------------------------------------------------------------------------------------

CONFIG_FILE, PARAMS_DIR = "config.json", "params"


def save_converted(model: RetNet, outdir, *, force: bool = False) -> Path:
    """Write `outdir/config.json` (the RetNetConfig) and an orbax checkpoint of the parameters in
    `outdir/params`. Refuses to overwrite unless `force`. Returns the directory."""
    import orbax.checkpoint as ocp

    outdir = Path(outdir).absolute()
    targets = [outdir / CONFIG_FILE, outdir / PARAMS_DIR]
    if not force and any(t.exists() for t in targets):
        raise FileExistsError(f"{outdir} already holds a converted checkpoint (use force=True / --force)")
    outdir.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(outdir / PARAMS_DIR, params, force=force)
    (outdir / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    return outdir


def load_converted(outdir) -> tuple[RetNetConfig, RetNet]:
    """Read what `save_converted` (or `retnet-jax convert-torchscale`) wrote: `(cfg, model)`."""
    import orbax.checkpoint as ocp

    outdir = Path(outdir).absolute()
    cfg = RetNetConfig.from_dict(json.loads((outdir / CONFIG_FILE).read_text()))
    graphdef, params, constants = _abstract_model(cfg)
    target = nnx.to_pure_dict(params)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(outdir / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(params, restored)
    return cfg, nnx.merge(graphdef, params, constants)


def count_parameters(model: RetNet) -> int:
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
