"""Where prepared data lives, and how it gets there safely when processes race.

Everything prepared is written under a temporary name beside its final path and renamed into place,
so a reader never sees half a file and two processes preparing the same thing both succeed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "RETNET_JAX_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $RETNET_JAX_CACHE, else $XDG_CACHE_HOME/retnet_jax (~/.cache/retnet_jax)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retnet_jax")
    return Path(cache_dir).expanduser()


def publish_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """`build(tmp)` into a fresh folder beside `final`, then rename it to `final` (kept if present)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():  # a failure of our own, not another process that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def publish_file(final: Path, build: Callable[[Path], None]) -> Path:
    """`build(tmp)` into a temporary file beside `final`, then atomically replace `final` with it."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    try:
        build(Path(tmp))
        os.replace(tmp, final)  # a racing process wrote the same bytes: either copy will do
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return final
