"""The launch scripts run end to end (tiny sizes), so they cannot rot between benchmark runs."""

import importlib.util
import json
import os
from pathlib import Path

import jax
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_retention_quick_run_writes_every_form_and_the_model_line(tmp_path, capsys):
    """Given `--quick`, the benchmark prints its table and saves JSON with a row per form and length,
    the matmul rate it compares against, the machine, the model's tokens/s and torchscale's."""
    bench = load_script("bench_retention")
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "float32 matmul rate" in printed and "chunkwise" in printed
    assert result["matmul_gflops"] > 0 and result["machine"]["backend"]
    # The precision the run used (this suite asks for "highest", tests/conftest.py), and what float32
    # matmuls then cost in accuracy on this backend.
    assert result["machine"]["matmul_precision"] == jax.config.jax_default_matmul_precision == "highest"
    assert 0 <= result["machine"]["float32_matmul_relative_error"] < 1e-5
    assert {(r["form"], r["T"]) for r in result["forms"]} == {
        (form, t) for form in ("parallel", "chunkwise", "recurrent") for t in (64, 256)}
    assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 for r in result["forms"])
    assert result["model"][0]["tokens_per_s"] > 0
    # CI installs torchscale: the official model is then timed in the same run, and compared.
    if importlib.util.find_spec("torchscale") is not None or os.environ.get("CI"):
        assert result["torchscale"][0]["tokens_per_s"] > 0
        # compared round by round: the median of the per-round ratios is the reported check
        ratio = result["torchscale"][0]["ours_over_torchscale"]
        assert len(ratio["rounds"]) == len(result["model"][0]["round_seconds"]) == 2
        assert ratio["q1"] <= ratio["median"] <= ratio["q3"]
        assert result["checks"]["model_over_torchscale_128"] == ratio["median"] > 0
        # and the model's main matmul shapes are timed in both libraries, for the same comparison.
        assert set(result["matmul_libraries"]) == set(bench.LIBRARY_SHAPES)
        assert all(r["xla"] > 0 and r["torch"] > 0 for r in result["matmul_libraries"].values())
