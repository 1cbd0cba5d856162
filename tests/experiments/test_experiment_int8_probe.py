"""The int8 probe's smoke run: every variant timed, and the int8 and bfloat16 products close to float32's."""

import json

from helpers import load_experiment


def test_int8_probe_smoke_times_every_variant_and_its_products_are_right(tmp_path):
    probe = load_experiment("int8_probe")
    result = probe.run(probe.parse_args(["--smoke", "--out-dir", str(tmp_path)]))
    saved = json.loads((tmp_path / "int8_probe.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    settings = saved["settings"]
    assert settings["smoke"] and settings["variants"] == list(probe.VARIANTS)
    # Every variant at every M, with positive times and a ratio to the float32 baseline.
    assert [(r["m"], r["variant"]) for r in saved["rows"]] == [
        (m, v) for m in settings["ms"] for v in probe.VARIANTS
    ]
    for row in saved["rows"]:
        assert len(row["times_s"]) == settings["rounds"] and min(row["times_s"]) > 0
        assert row["ms_per_step"] > 0 and row["ratio_to_f32"] > 0 and row["compile_s"] > 0
        assert row["hlo"]["loops"] >= 1
        assert sum(row["hlo"]["weight_dtypes_in_loop"].values()) == settings["weights"]
        # The timed programs compute what float32 does, up to the rounding of a few chained steps.
        assert row["scan_output_rel_err"] < 0.1
    # A per-step variant converts its compact weights inside the loop only where a conversion exists.
    by_key = {(r["m"], r["variant"]): r["hlo"] for r in saved["rows"]}
    assert by_key[(1, "w8_per_step")]["weight_dtypes_in_loop"] == {"s8": settings["weights"]}
    assert by_key[(1, "w8_hoisted")]["weight_converts_in_loop"] == 0
    # The products of each int8 and bfloat16 format against float32's (relative L2 error), at each M.
    accuracy = saved["accuracy"]
    assert set(accuracy) == {"w8", "a8w8", "bf16"}
    for fmt, found in accuracy.items():
        tolerance = probe.PRODUCT_TOLERANCE[fmt]
        assert found["tolerance"] == tolerance
        assert sorted(map(int, found["product_rel_err_by_m"])) == sorted(settings["ms"])
        for errors in found["product_rel_err_by_m"].values():
            assert len(errors) == len(probe.LAYER_KINDS) + 1
            assert all(0 < e < tolerance for e in errors.values()), (fmt, errors)
    assert saved["xla_flags"] is None or isinstance(saved["xla_flags"], str)
    assert set(saved["cpu_flags"]) == set(probe.CPU_FLAGS)
    assert saved["machine"]["cpu_count"] >= 1
    table = probe.table(saved["rows"]).splitlines()
    assert len(table) == 2 + len(saved["rows"]) and table[2].startswith("| 1 | f32 | ")
