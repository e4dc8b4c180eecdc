"""The trainer on 8 simulated CPU devices: three train steps on meshes (2, 2, 2) and (1, 2, 4)
against the same steps on one device, for RetNet and the Transformer baseline.

The steps run in one subprocess (`train_multidevice_checks.py`). Oracle: the one-device run, same
initial parameters, batches and optimizer. Tolerance 1e-5 relative on each step's loss (float32 at
"highest" precision): a sharded program sums partial products in another order, and the Adam
updates carry that rounding into the next steps' losses (measured <= 4e-6 at a learning rate of
1e-2, less at the 1e-3 used here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import relative_error

TOL = 1e-5
FAMILIES = ("retnet", "transformer")
MESHES = ("(2, 2, 2)", "(1, 2, 4)")


@pytest.fixture(scope="module")
def report() -> dict:
    script = Path(__file__).with_name("train_multidevice_checks.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=1500)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_three_steps_on_a_mesh_give_the_one_device_losses(report, family, mesh):
    expected = report[family]["1 device"]["losses"]
    got = report[family][mesh]["losses"]
    assert len(got) == len(expected) == 3
    errors = [relative_error(a, b) for a, b in zip(got, expected)]
    print(f"\n{family} on {mesh} vs one device, relative loss difference per step: {errors}")
    assert max(errors) <= TOL, (got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_and_adam_moments_stay_sharded_as_the_rules_say(report, family, mesh):
    """After three donated steps, every parameter and both of Adam's moments of it carry the
    sharding their logical axes give (`variable_spec`): out_shardings kept them in place."""
    result = report[family][mesh]
    assert result["mesh"] == dict(zip(("data", "fsdp", "tensor"), json.loads(mesh.replace("(", "[").replace(")", "]"))))
    wrong = {path: spec for path, (spec, ok) in result["placed"].items() if not ok}
    assert wrong == {}
    assert {path.split(".")[0] for path in result["placed"]} == {"params", "mu", "nu"}


@pytest.mark.slow
def test_megatron_and_fsdp_layout_of_a_trained_retnet(report):
    placed = report["retnet"]["(2, 2, 2)"]["placed"]
    assert placed["params.blocks.retention.qkvg_proj"][0] == "P(None, 'fsdp', 'tensor', None)"
    assert placed["mu.blocks.ffn.in_proj"][0] == "P(None, 'fsdp', None, 'tensor')"
    assert placed["nu.embed"][0] == "P('tensor', 'fsdp')"


@pytest.mark.slow
def test_a_batch_the_mesh_cannot_split_is_refused(report):
    assert report["errors"] == {
        "batch": "mesh: batch_size=6 cannot be split over data x fsdp = 4 x 2 = 8 devices",
        "micro_batches": "mesh: batch_size=16 (micro-batches of 4 rows) cannot be split over data x "
                         "fsdp = 4 x 2 = 8 devices"}
