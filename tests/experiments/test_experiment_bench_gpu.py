"""The GPU benchmark's smoke run goes through every code path on CPU and reports what it cannot run.

One run of ``experiments/bench_gpu.py --smoke`` (tiny preset and a tiny random Marian directory,
one process per engine group) with the roofline's two greedy workloads only: the beam workload
would add four compiles (about 12 s on 2 cores), and CTranslate2's beam search against jaxformer's
is tested by ``test_experiment_bench_decode.py``. The assertions read its JSON. In the project's
environment CTranslate2 is installed but PyTorch and transformers are not: HF PyTorch and
CTranslate2's Marian conversion must then be reported unavailable with a reason, not crash the run.
"""

import importlib.util
import json

import pytest

from helpers import load_experiment

pytest.importorskip(
    "ctranslate2",
    reason="CTranslate2 is not installed (pip install -e '.[ctranslate2]' from the repository root)",
)

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
SHAPES = ("tiny", "marian-tiny")
WORKLOADS = {"b4_greedy": (4, 1, 128), "b4_greedy_half": (4, 1, 64)}  # batch, beam, new tokens


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    bench = load_experiment("bench_gpu")
    argv = ["--smoke", "--out-dir", str(out), "--workloads", *WORKLOADS]
    result = bench.run(bench.parse_args(argv))
    return bench, result, json.loads((out / "bench_gpu.json").read_text()), out


def test_the_smoke_run_writes_every_engine_or_its_reason(smoke):
    _, result, saved, out = smoke
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and saved["complete"]
    settings = saved["settings"]
    assert settings["device"] == "cpu" and settings["smoke"] and settings["new_tokens"] == 128
    engines = set(settings["engines"])
    assert engines == {
        "jaxformer_float32", "jaxformer_bfloat16", "ct2_float32", "ct2_float16", "ct2_int8",
        "hf_torch_float32",
    }  # fmt: skip
    measured = {(r["shape"], r["engine"]) for r in saved["rows"]}
    missing = {(u["shape"], u["engine"]): u["reason"] for u in saved["unavailable"]}
    # Every engine of every shape is either measured or reported with a reason; never both.
    assert measured | set(missing) == {(s, e) for s in SHAPES for e in engines}
    assert not measured & set(missing)
    assert all(reason.strip() for reason in missing.values())
    for shape in SHAPES:
        assert "float16 skipped on CPU" in missing[(shape, "ct2_float16")]
        assert {(shape, "jaxformer_float32"), (shape, "jaxformer_bfloat16")} <= measured
    assert {("tiny", "ct2_float32"), ("tiny", "ct2_int8")} <= measured
    if HAVE_TORCH:
        assert {(s, "hf_torch_float32") for s in SHAPES} <= measured
    else:
        assert "not installed" in missing[("tiny", "hf_torch_float32")]
        assert "needs transformers and torch" in missing[("marian-tiny", "ct2_float32")]
    text = (out / "bench_gpu.md").read_text()
    assert "| tiny | b4_greedy | jaxformer_bfloat16 |" in text
    assert "| tiny | - | ct2_float16 | unavailable: float16 skipped on CPU" in text


def test_rows_count_exactly_the_forced_tokens_and_compare_ids(smoke):
    _, _, saved, _ = smoke
    rows = {(r["shape"], r["workload"], r["engine"]): r for r in saved["rows"]}
    for (shape, workload, _), row in rows.items():
        batch, beam, n = WORKLOADS[workload]
        assert (row["batch"], row["beam"], row["new_tokens"]) == (batch, beam, n)
        assert row["tokens"] == batch * n and len(row["times_s"]) == 3  # 3 N / N/2 pairs
        assert row["tokens_per_s"] > 0 and row["first_call_s"] > 0
        reference = rows[(shape, workload, "jaxformer_float32")]
        assert row["vs_jaxformer_float32"] == pytest.approx(
            row["tokens_per_s"] / reference["tokens_per_s"]
        )
    # Same weights, same search: CTranslate2 float32 decodes the peaked tiny model to jaxformer's ids.
    for workload in WORKLOADS:
        assert rows[("tiny", workload, "ct2_float32")]["rows_equal_to_jaxformer_float32"] == 1.0
        assert "rows_equal_to_jaxformer_float32" in rows[("tiny", workload, "jaxformer_bfloat16")]
        if HAVE_TORCH:  # base shapes: HF has its own random weights, so no comparison
            assert (
                "rows_equal_to_jaxformer_float32"
                not in rows[("tiny", workload, "hf_torch_float32")]
            )


def test_the_roofline_counts_the_bytes_a_step_reads(smoke):
    bench, _, saved, _ = smoke
    counts = saved["shapes"]["tiny"]["step_counts"]
    # tiny: D 32, F 64, V 32, 2 decoder layers of 4 heads. A layer's matrices: self qkv + out
    # (4 D^2), cross query + out (2 D^2; its key/value projection runs once per source), the
    # feed-forward (2 D F); plus the untied output layer (D V).
    assert counts["matrices"] == 2 * (6 * 32 * 32 + 2 * 32 * 64) + 32 * 32
    assert counts["all_matrices"] == counts["matrices"] + 2 * 2 * 32 * 32 + 32 * 32
    assert (counts["embedding_row"], counts["layers"], counts["kv_width"]) == (32, 2, 32)
    roofline = {(e["shape"], e["engine"]): e for e in saved["roofline"]}
    assert {e["workload"] for e in saved["roofline"]} == {"b4_greedy"}
    f32 = roofline[("tiny", "jaxformer_float32")]
    assert f32["fraction_of_peak"] > 0 and f32["step_ms"] > 0 and f32["gbps"] > 0
    assert f32["fraction_of_peak"] == pytest.approx(f32["gbps"] / saved["settings"]["peak_gbps"])
    assert f32["fraction_of_peak_all_params"] > f32["fraction_of_peak"]
    engine = next(e for e in bench.all_engines("cpu") if e.name == "jaxformer_float32")
    source_tokens = saved["shapes"]["tiny"]["source_tokens"]["b4_greedy"]
    assert source_tokens == 4 * 8
    step = lambda n: bench.call_bytes(counts, engine, 4, source_tokens, n)
    assert f32["step_mb"] == pytest.approx((step(128) - step(64)) / 64 / 1e6)
    # bfloat16 parameters and caches: half the bytes of float32.
    bf16 = roofline[("tiny", "jaxformer_bfloat16")]
    assert bf16["step_mb"] == pytest.approx(f32["step_mb"] / 2)
    for entry in saved["roofline"]:  # every engine: a positive fraction, or why there is none
        assert (entry["fraction_of_peak"] or 0) > 0 or "not positive" in entry["note"]
