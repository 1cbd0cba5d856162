"""bench_lm.py's smoke run (a tiny Llama written like the 1B one): memory of every loading mode,
and jaxformer's row of the speed table, into a temp directory."""

import json

from helpers import load_experiment


def test_bench_lm_smoke_measures_loading_and_decoding(tmp_path):
    bench = load_experiment("bench_lm")
    model_dir = tmp_path / "tiny-llama"
    argv = ["--smoke", "--out", str(tmp_path), "--model-dir", str(model_dir)]
    bench.main([*argv, "--engines", "jaxformer_float32", "--workloads", "greedy_b1"])
    saved = json.loads((tmp_path / "bench_lm.json").read_text())
    modes = {m["mode"]: m for m in saved["memory"]}
    assert set(modes) == {"bfloat16", "bfloat16_mesh8"}  # the smoke run's two
    size = (model_dir / "model.safetensors").stat().st_size
    # Parameters held as stored (bfloat16: the whole checkpoint is them), on one device or eight.
    for mode in modes.values():
        assert abs(mode["params_gb"] * 1e9 - size) < 0.01 * size and mode["peak_added_gb"] > 0
    (row,) = saved["speed"]["rows"]
    assert row["engine"] == "jaxformer_float32" and row["rows_equal_jaxformer_f32"] == 1.0
    assert row["ms_per_step"] > 0 and row["runs_s"] and saved["speed"]["loads"]["jaxformer_float32"]
    table = (tmp_path / "bench_lm.md").read_text()
    assert "| jaxformer_float32 |" in table and "| bfloat16_mesh8 |" in table
