"""Interoperability with other RetNet implementations.

`retnet_jax.interop` itself needs only JAX and NumPy: torch is imported lazily by the functions that
read or produce torch tensors, orbax by the functions that write or read converted checkpoints, and
torchscale is never imported here (its state dicts and incremental states are plain dicts of tensors);
`retnet_jax.interop.official.import_torchscale()` imports it, for running the two side by side.
"""

from retnet_jax.interop.state import (
    MissingKeySumWarning,
    position_from_scale,
    state_from_torchscale,
    state_to_torchscale,
)
from retnet_jax.interop.torchscale import (
    PARAM_MAP,
    infer_torchscale_args,
    load_converted,
    load_torchscale,
    save_converted,
    to_torchscale,
    torchscale_args,
    torchscale_config,
)

__all__ = [
    "PARAM_MAP",
    "MissingKeySumWarning",
    "infer_torchscale_args",
    "load_converted",
    "load_torchscale",
    "position_from_scale",
    "save_converted",
    "state_from_torchscale",
    "state_to_torchscale",
    "to_torchscale",
    "torchscale_args",
    "torchscale_config",
]
