"""The serving benchmark's smoke configuration runs end to end: both servers start, take an
open-loop load and give the same texts (no timing is asserted)."""

import json

from helpers import load_experiment


def test_bench_serve_smoke_writes_results(tmp_path):
    bench = load_experiment("bench_serve")
    bench.run(bench.parse_args(["--smoke", "--out-dir", str(tmp_path)]))
    saved = json.loads((tmp_path / "bench_serve.json").read_text())
    rows = {r["system"]: r for r in saved["rows"]}
    assert set(rows) == {"engine", "static"}
    for row in rows.values():
        assert row["requests"] > 0 and row["completed"] == row["requests"], row
        assert row["tokens_per_s"] > 0 and row["latency_p95"] >= row["latency_p50"] > 0
        assert row["streams"] > 0 and row["ttft_p50"] > 0
    assert rows["engine"]["same_text_as_static"] == 1.0  # greedy: the same texts
    assert "| 8 | engine |" in (tmp_path / "bench_serve.md").read_text()
