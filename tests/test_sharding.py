"""Sharding: logical axis rules, meshes, and the models on 8 simulated CPU devices.

The multi-device measurements run in one subprocess (`multidevice_checks.py`; JAX must be told
about the 8 host devices before it starts) and are asserted here. Oracle: the same model, built
with the same seed, on one device. Tolerance 1e-5 relative (float32 at "highest" precision): a
sharded program sums partial products in another order; measured ~1e-6 for logits, <= 7e-6 for
gradients of the recurrent form (64 sequential steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from retnet_jax import RetNet, RetNetConfig
from retnet_jax.sharding import RULES, axis_rules, logical_spec, make_mesh, variable_spec

TOL = 1e-5
MESHES = ("(8, 1, 1)", "(2, 2, 2)", "(1, 2, 4)")
MODELS = ("retnet", "transformer")


@pytest.fixture(scope="module")
def report() -> dict:
    script = Path(__file__).with_name("multidevice_checks.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=1500)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


# --- the rules, in-process ----------------------------------------------------------------------

def test_default_rules_split_batch_over_data_and_fsdp_and_weights_megatron_style():
    assert logical_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert logical_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_spec(("heads", "head_dim", "embed")) == P("tensor", None, "fsdp")
    assert logical_spec(("layers", "embed", "pieces", "mlp")) == P(None, "fsdp", None, "tensor")
    assert logical_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_spec(("norm",)) == P(None)


def test_a_mesh_axis_is_used_once_per_array():
    """`embed -> fsdp` is dropped when `batch` already took fsdp."""
    assert logical_spec(("batch", "embed")) == P(("data", "fsdp"), None)


def test_user_rules_replace_the_table():
    rules = (("batch", "data"), ("embed", "tensor"))
    assert logical_spec(("batch", "embed"), rules) == P("data", "tensor")
    with axis_rules(rules):
        assert logical_spec(("embed", "heads")) == P("tensor", None)
    assert logical_spec(("embed", "heads")) == P("fsdp", "tensor")  # restored


def test_rules_naming_an_unknown_mesh_axis_are_refused():
    with pytest.raises(ValueError, match=r"rules: 'embed' maps to unknown mesh axis 'model'"):
        logical_spec(("embed",), (("embed", "model"),))


def test_every_parameter_carries_logical_axes_matching_its_shape():
    model = nnx.eval_shape(lambda: RetNet(RetNetConfig.preset("tiny", deepnorm=True, norm="layernorm",
                                                              head_norm="groupnorm"), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("logical_axes")
        assert names is not None and len(names) == len(var.shape), path
        assert all(name in dict(RULES) for name in names), (path, names)
        variable_spec(var)  # raises on a mismatch


def test_make_mesh_defaults_to_every_device_on_data():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=2, fsdp=1, tensor=1), r"data x fsdp x tensor = 2 x 1 x 1 = 2 must equal the number of devices, 1"),
    (dict(fsdp=2), r"fsdp x tensor = 2 does not divide the 1 devices"),
    (dict(tensor=0), r"tensor must be a positive int, got 0"),
])
def test_make_mesh_names_a_shape_that_does_not_fit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**kwargs, devices=jax.devices()[:1])


# --- 8 simulated devices -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_model_computes_what_one_device_computes(report, model, mesh):
    """Parameters created in their sharding equal the unsharded ones exactly; logits in all three
    modes and the loss gradients agree with the one-device model to 1e-5."""
    result = report[model]["meshes"][mesh]
    assert result["params_equal_unsharded"] == 0.0
    for mode, err in result["logits"].items():
        assert err <= TOL, (mode, err)
    for mode, err in result["grads"].items():
        assert err <= TOL, (mode, err)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_are_sharded_as_the_rules_say(report, model, mesh):
    """Every parameter's `sharding.spec` is its logical names through `RULES`; each device holds
    the total divided by fsdp x tensor, norms (replicated) aside."""
    result = report[model]["meshes"][mesh]
    assert result["specs_follow_rules"]
    assert result["params_not_split_fsdp_x_tensor"] == []
    assert result["bytes_per_device"] == [int(result["expected_bytes_per_device"])]


@pytest.mark.slow
def test_megatron_layout_of_the_retnet_parameters(report):
    specs = report["retnet"]["meshes"]["(2, 2, 2)"]["specs"]
    assert specs["blocks.retention.qkvg_proj"] == "P(None, 'fsdp', 'tensor', None)"  # [L, d, H, 2dk+2dv]
    assert specs["blocks.retention.out_proj"] == "P(None, 'tensor', None, 'fsdp')"  # [L, H, dv, d]
    assert specs["blocks.ffn.in_proj"] == "P(None, 'fsdp', None, 'tensor')"  # [L, d, 2, ffn]
    assert specs["blocks.ffn.out_proj"] == "P(None, 'tensor', 'fsdp')"  # [L, ffn, d]
    assert specs["embed"] == "P('tensor', 'fsdp')"


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", ("parallel", "chunkwise", "recurrent"))
def test_tensor_parallel_block_needs_two_all_reduces_and_no_all_gather(report, model, mode):
    """Megatron: the block's input is replicated, q/k/v/g and the FFN input are split by head and
    hidden unit, and only the two output projections sum partial results across devices."""
    counts = report[model]["block_collectives"][mode]
    assert counts["all-reduce"] + counts["all-reduce-start"] == 2, counts
    assert counts["all-gather"] == 0 and counts["all-to-all"] == 0, counts
