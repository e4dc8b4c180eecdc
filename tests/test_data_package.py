"""Layering: the model package stays light; the data package brings its own dependencies, never TF."""

import subprocess
import sys

HEAVY = ("grain", "tensorflow_datasets", "sentencepiece", "array_record", "tensorflow")


def test_import_retnet_jax_loads_no_data_dependency_and_data_loads_no_tensorflow():
    code = (
        "import sys\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = lambda: sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "import retnet_jax\n"
        "print(loaded())\n"
        "import retnet_jax.data\n"
        "print(loaded())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = out.stdout.strip().splitlines()
    assert before == "[]", out.stdout + out.stderr
    assert after == str(sorted(set(HEAVY) - {"tensorflow"})), out.stdout + out.stderr
