"""experiments/bench_training.py runs end to end in its smoke mode, so it cannot rot between runs."""

from __future__ import annotations

import json

import pytest
from conftest import experiment_script


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The script with its results folder moved to `tmp_path` (the committed results stay as they are)."""
    return experiment_script("bench_training", tmp_path, monkeypatch)


@pytest.mark.slow
def test_quick_run_measures_every_model_compile_times_and_the_loop(bench, tmp_path, capsys):
    assert bench.main(["--quick"]) == 0
    result = json.loads((tmp_path / "bench_training_quick.json").read_text())
    assert (tmp_path / "bench_training_quick.png").read_bytes()[:4] == b"\x89PNG"
    kinds = {(r["family"], r["mode"]) for r in result["steps"] if r["tokens_per_s"] > 0}
    assert kinds == {("retnet", "chunkwise"), ("retnet", "parallel"), ("transformer", "parallel")}
    assert all(r["xla_bytes"] > 0 and r["peak_rss_bytes"] > 0 and r["gflops"] > 0 for r in result["steps"])
    assert [r["layers"] for r in result["compile"]] == [2, 4]
    assert result["loop"]["loop_tokens_per_s"][0] > 0 and result["loop"]["bare_tokens_per_s"][0] > 0
    assert set(result["checks"]) >= {"compile_4_over_2_layers", "xla_compile_4_over_2_layers", "loop_over_bare_step"}
    assert "retnet chunkwise" in capsys.readouterr().out


def test_quick_run_refuses_to_overwrite_the_full_results(bench):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(bench.RESULTS / bench.FULL)])


@pytest.mark.slow
def test_only_steps_remeasures_its_lengths_and_keeps_the_others(bench, tmp_path):
    """`--only steps` replaces the rows of the lengths measured now and keeps every other length's."""
    out = tmp_path / "bench_training_quick.json"
    assert bench.main(["--quick"]) == 0
    result = json.loads(out.read_text())
    kept = dict(result["steps"][0], T=99999, tokens_per_s=-1.0)  # a length this run does not measure
    result["steps"].append(kept)
    out.write_text(json.dumps(result))
    assert bench.main(["--quick", "--only", "steps"]) == 0
    again = json.loads(out.read_text())
    assert [r for r in again["steps"] if r["T"] == 99999] == [kept]
    assert len([r for r in again["steps"] if r["T"] == 64]) == 3 and again["lengths_measured_now"] == [64]
    assert again["compile"] == result["compile"] and again["loop"] == result["loop"]
