"""Device meshes, logical axis names and the one table that maps them to mesh axes.

Every parameter carries logical axis names as NNX variable metadata (`logical_axes`, e.g.
`("embed", "heads", "head_dim")`), and the main activations are constrained by name with
`constrain(x, ("batch", "length", "embed"))`. `RULES` maps each logical name to mesh axes; a name
without a rule is replicated. A mesh axis already taken by an earlier dimension of the same array
is skipped, so `batch -> (data, fsdp)` and `embed -> fsdp` give activations `[B, T, d]` the spec
`(("data", "fsdp"), None, None)` and weights `[d, ...]` an FSDP-sharded first axis.

Meshes use `AxisType.Auto`: XLA's partitioner places the collectives (Megatron tensor parallelism
needs one all-reduce after each of a block's two output projections; FSDP all-gathers the weights),
and the model code runs unchanged, and unconstrained, on a single device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical name -> mesh axes. Megatron tensor parallelism splits heads, FFN hidden units and the
# vocabulary; FSDP splits the model width of every weight; the batch goes over data and fsdp.
RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    # Replicated (listed so the vocabulary of names is in one place):
    ("length", None), ("head_dim", None), ("layers", None), ("norm", None), ("norm_heads", None),
    ("pieces", None),
    ("cache", None),
)

_active_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar("retnet_jax_rules", default=RULES)


@contextlib.contextmanager
def axis_rules(rules: Rules | None) -> Iterator[Rules]:
    """Use `rules` (None: `RULES`) for `constrain` and `logical_spec` inside the block.

    Activation constraints are read when a function is traced: trace (first call of a jitted
    function) inside the same rules as its parameters were sharded with.
    """
    token = _active_rules.set(RULES if rules is None else _check_rules(rules))
    try:
        yield _active_rules.get()
    finally:
        _active_rules.reset(token)


def _check_rules(rules) -> Rules:
    try:
        rules = tuple((str(name), axes) for name, axes in rules)
    except (TypeError, ValueError) as err:
        raise ValueError(f"rules must be (logical_name, mesh_axes) pairs, got {rules!r}") from err
    for name, axes in rules:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            if axis not in MESH_AXES:
                raise ValueError(f"rules: {name!r} maps to unknown mesh axis {axis!r}; "
                                 f"mesh axes are {MESH_AXES}")
    return rules


def logical_spec(names: Sequence[str | None], rules: Rules | None = None,
                 mesh_axes: Sequence[str] = MESH_AXES) -> PartitionSpec:
    """The `PartitionSpec` of an array whose axes have the logical `names` (None: replicated).

    The first rule naming a logical axis applies; mesh axes already used by an earlier dimension,
    or absent from `mesh_axes`, are dropped.
    """
    table = dict(reversed(_active_rules.get() if rules is None else _check_rules(rules)))
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name in names:
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and a in mesh_axes)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the sharding its logical axis `names` give under the active mesh
    (`jax.set_mesh`) and rules; unchanged when no mesh is set (single-device use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.shape:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} axis names {tuple(names)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_spec(names, mesh_axes=mesh.axis_names))


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, *,
              devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A `(data, fsdp, tensor)` mesh with Auto axes over `devices` (default: all devices).

    `data` defaults to whatever the other two leave: `make_mesh()` puts every device on `data`.
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, value in (("fsdp", fsdp), ("tensor", tensor)) + ((("data", data),) if data is not None else ()):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"make_mesh: {name} must be a positive int, got {value!r}")
    if data is None:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"make_mesh: fsdp x tensor = {fsdp * tensor} does not divide the "
                             f"{len(devices)} devices")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"make_mesh: data x fsdp x tensor = {data} x {fsdp} x {tensor} = "
                         f"{data * fsdp * tensor} must equal the number of devices, {len(devices)}")
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def variable_spec(variable: nnx.Variable, rules: Rules | None = None) -> PartitionSpec:
    """A variable's spec from its `logical_axes` metadata (replicated when it has none)."""
    names = variable.get_metadata().get("logical_axes")
    if names is None:
        return PartitionSpec()
    if len(names) != np.ndim(variable.get_value()):
        raise ValueError(f"logical_axes {names} do not match the variable's shape {variable.shape}")
    return logical_spec(names, rules)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> nnx.State:
    """A `NamedSharding` for every variable of an `nnx.State` (abstract or concrete), by its names."""
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, variable_spec(v, rules))), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(module_cls, cfg, mesh: jax.sharding.Mesh, *, seed: int = 0,
                 rules: Rules | None = None):
    """`module_cls(cfg, rngs=nnx.Rngs(seed))` with every variable created directly in its sharding.

    An abstract model gives the shapes and names; one `jax.jit` with `out_shardings` then creates
    the variables, so no device ever holds a whole weight it does not own. The values equal an
    unsharded `module_cls(cfg, rngs=nnx.Rngs(seed))`.
    """
    def create():
        return module_cls(cfg, rngs=nnx.Rngs(seed))

    with axis_rules(rules), jax.set_mesh(mesh):
        graphdef, abstract = nnx.split(nnx.eval_shape(create))
        shardings = state_shardings(abstract, mesh)
        state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def param_bytes_per_device(module) -> dict[Any, int]:
    """Bytes of parameters each device holds: `{device: bytes}`."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
