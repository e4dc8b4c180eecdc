"""Every ```python block of README.md runs, in order, in one namespace: the README cannot rot.

The blocks run in a fresh interpreter, as a reader would paste them, with this checkout first on the
path, in a temporary working directory (files a block writes land there) and a temporary data cache
(`RETNET_JAX_CACHE`). New blocks are picked up as they are added. A block that cannot run here is
preceded by `<!-- no-run: REASON -->`; the test names those in a warning. Prefer a block that runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NO_RUN = re.compile(r"<!--\s*no-run:\s*(?P<reason>\S.*?)\s*-->")

# Executes the blocks given on stdin; each is compiled at its own README line numbers, so a
# traceback shows the README's file name, line and source.
RUNNER = """
import json, sys, time
namespace = {"__name__": "__main__"}
for line, source in json.load(sys.stdin):
    start = time.perf_counter()
    exec(compile("\\n" * (line - 1) + source, sys.argv[1], "exec"), namespace)
    print(f"README.md:{line} ran in {time.perf_counter() - start:.1f} s", flush=True)
"""


def python_blocks(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """`([(first line of code, source)], [(line, no-run reason)])` of the ```python blocks, in order."""
    lines = text.splitlines()
    blocks, skipped = [], []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: a ```python block is never closed")
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_RUN.search(previous)
        if marker:
            skipped.append((i + 2, marker["reason"]))
        else:
            blocks.append((i + 2, "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks, skipped


def test_no_run_marker_skips_the_next_block_only():
    text = "```python\na = 1\n```\n<!-- no-run: needs a GPU -->\n\n```python\nb = 2\n```\n```python\nc = 3\n```\n"
    assert python_blocks(text) == ([(2, "a = 1\n"), (10, "c = 3\n")], [(7, "needs a GPU")])


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs(tmp_path):
    blocks, skipped = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    if skipped:
        warnings.warn("README.md blocks not run: " + "; ".join(f"line {n} ({why})" for n, why in skipped))

    env = dict(os.environ, RETNET_JAX_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", RUNNER, str(README)], input=json.dumps(blocks),
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    if run.returncode and not os.environ.get("CI") and "No module named 'torch'" in run.stderr:
        pytest.skip("torch is not installed (README's torchscale example); CI requires it")
    assert run.returncode == 0, f"a README block failed:\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}"
    assert run.stdout.count(" ran in ") == len(blocks), run.stdout
