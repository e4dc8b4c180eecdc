"""The package's public surface: the names users and notebooks rely on, and its layering."""

import subprocess
import sys
from pathlib import Path

import retnet_jax

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_names_import():
    """The names the README and the issues promise are importable from where they say."""
    from retnet_jax import RetNet, RetNetConfig  # noqa: F401
    from retnet_jax.ops import (  # noqa: F401
        chunkwise_retention,
        parallel_retention,
        recurrent_retention,
        retention_step,
    )
    assert retnet_jax.__version__


def test_retention_ops_import_no_flax():
    """`retnet_jax.ops` is pure JAX: importing it in a fresh interpreter loads no Flax module."""
    # A bare `retnet_jax` package object, so that its __init__ (which imports the NNX model) does
    # not run: only what `retnet_jax.ops` itself imports gets loaded.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('retnet_jax'); pkg.__path__ = [{str(ROOT / 'retnet_jax')!r}]\n"
        "sys.modules['retnet_jax'] = pkg\n"
        "import retnet_jax.ops\n"
        "print(sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
