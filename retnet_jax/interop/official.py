"""Import the official PyTorch RetNet (torchscale 0.3.0) to run it beside this package.

torchscale's `droppath` module imports `timm` for `drop_path` alone, and timm needs torchvision, which
does not install cleanly beside a CPU torch. `import_torchscale()` registers a minimal stand-in for
`timm.models.layers` when timm is not importable, then imports torchscale's RetNet. The parity tests
and the benchmark use it; nothing else in `retnet_jax` imports torchscale.
"""

from __future__ import annotations

import importlib
import sys
import types

INSTALL_HINT = ('pip install "torch==2.13.0" && '
                'pip install --no-deps "torchscale==0.3.0" "fairscale==0.4.13"')


def _drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """timm.models.layers.drop_path: identity unless training with drop_prob > 0."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def install_timm_stand_in() -> bool:
    """Register `timm.models.layers.drop_path` unless the real timm imports; True if it did."""
    try:
        importlib.import_module("timm.models.layers")
        return False
    except Exception:  # noqa: BLE001 - timm absent, or present but broken (torchvision)
        for name in ("timm", "timm.models", "timm.models.layers"):
            sys.modules.pop(name, None)
    timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
    layers.drop_path = _drop_path
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
    return True


def import_torchscale() -> types.SimpleNamespace:
    """`(RetNetConfig, RetNetDecoder)` of torchscale 0.3.0 as a namespace; ImportError with the
    install command when torch, fairscale or torchscale is missing."""
    try:
        importlib.import_module("torch")
        importlib.import_module("fairscale")
        install_timm_stand_in()
        config = importlib.import_module("torchscale.architecture.config")
        retnet = importlib.import_module("torchscale.architecture.retnet")
    except ImportError as err:
        raise ImportError(f"the official RetNet needs torch, fairscale and torchscale 0.3.0 "
                          f"({err}); install them with: {INSTALL_HINT}") from err
    return types.SimpleNamespace(RetNetConfig=config.RetNetConfig, RetNetDecoder=retnet.RetNetDecoder)
