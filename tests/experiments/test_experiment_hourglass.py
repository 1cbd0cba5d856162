"""The hourglass experiment's smoke configuration runs end to end and writes sane results."""

import json
import math

from helpers import load_experiment


def load():
    return load_experiment("hourglass")


def test_hourglass_smoke_writes_results(tmp_path):
    experiment = load()
    report = experiment.run(experiment.parse_args(["--smoke", "--out-dir", str(tmp_path)]))
    saved = json.loads((tmp_path / "hourglass.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert saved["data"]["source"] == "synthetic"
    results = saved["results"]
    assert set(results) == {"vanilla", "hourglass"}
    for name in ("vanilla", "hourglass"):
        r = results[name]
        steps = [row["step"] for row in r["log"]]
        assert steps[0] == 0 and steps[-1] == r["steps"] == 30
        assert all(math.isfinite(row["valid_bpc"]) for row in r["log"])
        assert math.isfinite(r["valid_bpc_full"])
        losses = [row["train_loss"] for row in r["log"][1:]]
        assert losses[-1] < r["first_train_loss"]  # the training loss fell
        assert r["log"][-1]["valid_bpc"] < r["log"][0]["valid_bpc"]
        assert r["train_tokens_per_s"] > 0 and r["compile_s"] > 0
        assert r["train_memory"]["total_bytes"] > 0
        gen = r["generation"]
        assert gen["ids_agree"] and gen["cached"]["ids"] == gen["recompute"]["ids"]
        assert len(gen["cached"]["ids"][0]) == 16
        assert gen["cached"]["tokens_per_s"] > 0 and gen["recompute"]["tokens_per_s"] > 0
    summary = saved["summary"]
    assert summary["equal_steps"] == 30
    assert set(summary["bpc_at_equal_steps"]) == {"vanilla", "hourglass"}
    assert all(math.isfinite(v) for v in summary["bpc_at_equal_time"].values())
    assert saved["machine"]["cpu_count"] >= 1
    png = tmp_path / "hourglass.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recompute_matches_cached_on_a_batch(key):
    """Both generation paths agree on a batch of 2, untrained hourglass, attention upsampling."""
    import jax
    import numpy as np

    import jaxformer

    experiment = load()
    config = jaxformer.hourglass_preset(
        "tiny", hierarchy="1@1 2@3 1@1", shortening="linear", upsampling="attention"
    )
    model = jaxformer.HourglassLM(config)
    params = jaxformer.init_params(model, key)
    # Larger weights make the untrained model's tokens vary, so the agreement means more.
    params = jax.tree.map(lambda x: 3.0 * x if x.ndim == 2 else x, params)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 4, 32)
    run = lambda fn: np.asarray(
        jax.jit(lambda p, s: fn(model, p, s, new_tokens=11))(params, prompt)
    )
    cached, recomputed = run(experiment.cached_greedy), run(experiment.recompute_greedy)
    assert cached.shape == (2, 11)
    np.testing.assert_array_equal(cached, recomputed)
    assert len(np.unique(cached)) > 2
