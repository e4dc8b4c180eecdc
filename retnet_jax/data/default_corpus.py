"""The default corpus: the running Python's standard library source, present on every machine.

The same Python version gives the same files, and the split goes by each file's path relative to
the standard library folder, so every machine with that version trains and validates on the same text.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})  # installed, not stdlib


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Every `.py` file under the standard library folder, relative and sorted (POSIX separators)."""
    root = stdlib_root() if root is None else root
    files = []
    for folder, dirs, names in os.walk(root):  # symlinked folders are not followed
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        relative = Path(folder).relative_to(root)
        files += [(relative / n).as_posix() for n in names if n.endswith(".py")]
    return sorted(files)
