"""Execute every notebook in notebooks/ headless; a cell that raises fails the test with its error."""

from __future__ import annotations

import os
import pathlib
import sys

import ipykernel  # noqa: F401  (the "python3" kernel runs `sys.executable -m ipykernel_launcher`)
import nbclient
import nbformat
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600

# Appended to each notebook in memory (never saved): reports which interpreter the kernel runs.
_PROBE = "import sys; print(sys.executable)"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    # The kernel subprocess inherits this environment: put the repo root first on its PYTHONPATH so
    # it imports this checkout's retnet_jax whether or not the package is pip-installed.
    python_path = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",  # jupyter_client swaps the spec's "python" for sys.executable
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
        allow_errors=False,
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:  # carries the cell source and traceback
        pytest.fail(f"{path.name}: a cell raised\n{error}", pytrace=False)

    probe_out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    kernel_python = probe_out.strip().splitlines()[-1]
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable), (
        f"the kernel ran {kernel_python}, not pytest's interpreter {sys.executable}")


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name} has outputs: clear them before committing")
