"""The engine benchmark's smoke configuration runs end to end (no timing is asserted)."""

import json

from helpers import load_experiment


def test_bench_engine_smoke_writes_results(tmp_path):
    bench = load_experiment("bench_engine")
    args = bench.parse_args(["--smoke", "--out-dir", str(tmp_path), "--workloads", "greedy"])
    report = bench.run(args)
    saved = json.loads((tmp_path / "bench_engine.json").read_text())
    rows = {(r["workload"], r["system"]): r for r in saved["rows"]}
    assert set(rows) == {("greedy", "static"), ("greedy", "engine")}
    assert rows[("greedy", "engine")]["lines_equal_to_static"] == 1.0  # the same translations
    assert rows[("greedy", "engine")]["vs_static"] > 0 and len(report["loads"]) == 2
    assert "| greedy | engine |" in (tmp_path / "bench_engine.md").read_text()
