"""The decoding benchmark's smoke configuration runs end to end (no timing is asserted)."""

import json

import pytest

from helpers import load_experiment


def test_bench_decode_smoke_writes_results(tmp_path):
    pytest.importorskip(
        "ctranslate2",
        reason="CTranslate2 is not installed (pip install -e '.[ctranslate2]' from the repository root, or pip install ctranslate2)",
    )
    bench = load_experiment("bench_decode")
    engines = ["--engines", "jaxformer", "jaxformer_int8", "ct2_float32", "ct2_int8"]
    workloads = ["--workloads", "b1_greedy", "b2_beam2"]
    args = bench.parse_args(["--smoke", "--out-dir", str(tmp_path), *engines, *workloads])
    result = bench.run(args)
    saved = json.loads((tmp_path / "bench_decode.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert "| tiny | b2_beam2 | jaxformer |" in (tmp_path / "bench_decode.md").read_text()
    rows = {(r["workload"], r["engine"]): r for r in saved["rows"]}
    assert set(rows) == {
        (w, e)
        for w in ("b1_greedy", "b2_beam2")
        for e in ("jaxformer", "jaxformer_int8", "ct2_float32", "ct2_int8")
    }
    for (workload, _), row in rows.items():
        batch = {"b1_greedy": 1, "b2_beam2": 2}[workload]
        assert row["tokens"] == batch * 8 and len(row["times_s"]) == 1
        assert row["tokens_per_s"] > 0 and row["first_call_s"] > 0
        assert row["compile_s"] == pytest.approx(row["first_call_s"] - row["median_s"])
        for ct2 in ("ct2_float32", "ct2_int8"):
            assert row[f"vs_{ct2}"] == pytest.approx(
                row["tokens_per_s"] / rows[(workload, ct2)]["tokens_per_s"]
            )
    # Same weights, same search: a peaked tiny model decodes to the same ids in both engines.
    assert rows[("b1_greedy", "jaxformer")]["rows_equal_to_ct2_float32"] == 1.0
    assert rows[("b2_beam2", "jaxformer")]["rows_equal_to_ct2_float32"] == 1.0
    assert 0.0 <= rows[("b2_beam2", "jaxformer_int8")]["rows_equal_to_ct2_int8"] <= 1.0
    assert "| vs CT2 int8 |" in (tmp_path / "bench_decode.md").read_text()
    assert saved["machine"]["cpu_count"] >= 1 and len(saved["load_before"]) == 3


def test_bench_decode_pretrained_smoke_jaxformer_only(tmp_path):
    """``--pretrained``: a tiny random Marian directory written with numpy + safetensors (no torch),
    loaded by ``load_pretrained`` and decoded with padded sources, exactly N tokens per row."""
    bench = load_experiment("bench_decode")
    model_dir = tmp_path / "marian"
    argv = ["--smoke", "--pretrained", "marian-tiny", "--pretrained-dir", str(model_dir)]
    argv += ["--writer", "numpy", "--engines", "jaxformer", "--out-dir", str(tmp_path)]
    result = bench.run(bench.parse_args(argv))
    saved = json.loads((tmp_path / "bench_decode_marian_tiny.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "marian" and config["bad_words_ids"] == [[100]]
    info = saved["settings"]["pretrained"]
    assert info["shape"] == "marian-tiny" and info["written_by"] == "numpy"
    assert {(r["workload"], r["engine"]) for r in saved["rows"]} == {
        ("b1_greedy", "jaxformer"),
        ("b2_beam2", "jaxformer"),
    }
    for row in saved["rows"]:
        assert row["tokens"] == row["batch"] * 8 and row["tokens_per_s"] > 0
    assert len(saved["load_after_each_round"]) == 1 and len(saved["load_before"]) == 3
    src = bench.marian_sources(4, 8, 101)
    assert (src[:, 0] != 100).all() and (src == 0).sum() == 4  # one </s> a row, then <pad>
    assert (
        "| marian-tiny | b2_beam2 | jaxformer |"
        in (tmp_path / "bench_decode_marian_tiny.md").read_text()
    )
