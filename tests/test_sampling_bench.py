"""experiments/bench_inference.py runs end to end at tiny sizes (`--quick`), so it cannot rot between
benchmark runs; its full results are never touched."""

import importlib.util
import json

import pytest
from conftest import experiment_script


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The script with its results folder moved to `tmp_path`."""
    return experiment_script("bench_inference", tmp_path, monkeypatch)


@pytest.mark.slow
def test_quick_run_measures_every_configuration_and_reports_the_targets(bench, tmp_path, capsys):
    """`--quick` writes bench_inference_quick.json (and .png with matplotlib): a decode row per
    (context, batch) with both models' latencies and states, the floor and torchscale at batch 1 (when
    installed), the prefill times, the weight-streaming diagnostic, and every target as a check."""
    assert bench.main(["--quick"]) == 0

    written = {p.name for p in tmp_path.iterdir()}
    assert "bench_inference_quick.json" in written and "bench_inference.json" not in written
    result = json.loads((tmp_path / "bench_inference_quick.json").read_text())
    rows = {(r["context"], r["batch"]): r for r in result["decode"]}
    assert set(rows) == {(64, 1), (64, 2), (128, 1), (128, 2)}
    for row in rows.values():
        assert row["retnet_ms"] > 0 and row["transformer_ms"] > 0 and row["retnet_state_bytes"] > 0
        assert row["retnet_floor_ms"] > 0 and row["load_average_before"] is not None
    assert all(rows[c, 1]["floor_ms"] > 0 for c in (64, 128))
    if importlib.util.find_spec("torchscale") is not None:  # on all cores and on one thread
        assert all(rows[c, 1]["torchscale_same_tokens"] for c in (64, 128))
        for name in ("torchscale", "torchscale_1thread"):
            assert all(rows[c, 1][f"{name}_ms"] > 0 for c in (64, 128))
        assert "retnet_speedup_over_torchscale_batch1" in result["checks"]
    assert [p["T"] for p in result["prefill"]] == [64, 128]
    assert result["weight_streaming"]["separate_ms"] > 0
    assert {"retnet_latency_longest_over_shortest_context", "retnet_batch1_step_over_memory_floor",
            "retnet_latency_batch2_over_batch1"} <= set(result["checks"])
    assert "targets (measured in this run)" in capsys.readouterr().out


def test_quick_run_refuses_to_write_the_full_results(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path / "bench_inference.json")])
    assert not any(tmp_path.iterdir())
