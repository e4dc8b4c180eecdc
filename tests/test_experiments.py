"""The launch scripts run end to end (tiny sizes), so they cannot rot between benchmark runs."""

import importlib.util
import json
import os
import sys

import jax
import pytest
from conftest import experiment_script

from retnet_jax.ops.kernels import resolve_kernels


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The benchmark script with its results folder moved to `tmp_path`: the committed results are
    out of reach whatever it writes."""
    return experiment_script("bench_retention", tmp_path, monkeypatch)


@pytest.mark.slow
def test_bench_retention_quick_run_writes_every_form_and_the_model_line_to_its_own_files(bench, tmp_path, capsys):
    """Given `--quick`, the benchmark prints its table and saves `bench_retention_quick.json` (and
    `.png` where matplotlib is installed), never the full run's files, with a row per form and length,
    the kernels of the ops, the matmul rate it compares against, the machine, the model's tokens/s and
    torchscale's."""
    assert bench.main(["--quick"]) == 0

    plotted = importlib.util.find_spec("matplotlib") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["bench_retention_quick.json"] + ["bench_retention_quick.png"] * plotted)
    result = json.loads((tmp_path / "bench_retention_quick.json").read_text())
    printed = capsys.readouterr().out
    assert "float32 matmul rate" in printed and "chunkwise" in printed
    assert result["kernels"] == resolve_kernels("auto")
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


def test_bench_retention_quick_run_refuses_to_write_the_full_results(bench, tmp_path):
    """`--quick --out .../bench_retention.json` (the committed full run) is an argument error, raised
    before anything runs or is written."""
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path / "bench_retention.json")])
    assert not any(tmp_path.iterdir())


def test_bench_retention_without_matplotlib_writes_no_png_and_says_so(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    bench.write_results({"forms": []}, tmp_path / "run.json")
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    assert "no PNG written (matplotlib is not installed)" in capsys.readouterr().out
