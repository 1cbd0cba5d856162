"""The KV-cache experiment's smoke configuration runs end to end and its two paths agree."""

import json

import jax
import numpy as np
import pytest

from helpers import load_experiment


def load():
    return load_experiment("kv_cache")


def test_kv_cache_smoke_writes_results_and_paths_agree(tmp_path):
    kv_cache = load()
    result = kv_cache.run(kv_cache.parse_args(["--smoke", "--out-dir", str(tmp_path)]))
    saved = json.loads((tmp_path / "kv_cache.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(r["preset"], r["tokens"]) for r in saved["rows"]] == [("tiny", 8), ("tiny", 16)]
    for row in saved["rows"]:
        assert row["ids_agree"] and row["agreeing_tokens"] == row["tokens"]
        for method in ("cached", "recompute"):
            timing = row[method]
            assert timing["repeats"] == len(timing["times_s"]) == 1
            assert timing["ms_per_token"] > 0 and timing["compile_s"] > 0
        assert np.isclose(
            row["ratio"], row["recompute"]["ms_per_token"] / row["cached"]["ms_per_token"]
        )
    assert saved["all_ids_agree"]
    assert set(saved["slopes"]["tiny"]) == {"cached", "recompute"}
    assert saved["machine"]["cpu_count"] >= 1 and saved["machine"]["devices"]
    assert saved["machine"]["versions"]["jax"] == jax.__version__
    table = kv_cache.table(saved["rows"]).splitlines()
    assert table[1] == "|---|---:|---:|---:|---:|---:|---:|---|"
    assert table[2].startswith("| tiny | 8 | ") and table[2].endswith(" | yes |")
    assert len(table) == 2 + len(saved["rows"]) and {line.count("|") for line in table} == {9}
    png = tmp_path / "kv_cache.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recompute_equals_cached_on_a_batch(key):
    """Both paths on a batch of 3, with a length where the untrained model varies its tokens."""
    import jaxformer

    kv_cache = load()
    model = jaxformer.Transformer(jaxformer.preset("tiny"))
    params = jaxformer.init_params(model, key)
    # Larger weights make the untrained model's outputs vary, so the comparison means something.
    params = jax.tree.map(lambda x: 3.0 * x if x.ndim == 2 else x, params)
    src = jax.random.randint(jax.random.key(1), (3, 7), 3, 32)
    kwargs = dict(start_id=kv_cache.START_ID, end_id=kv_cache.END_ID, length=20)
    cached = np.asarray(
        jax.jit(lambda p, s: kv_cache.cached_greedy(model, p, s, **kwargs))(params, src)
    )
    recomputed = np.asarray(
        jax.jit(lambda p, s: kv_cache.recompute_greedy(model, p, s, **kwargs))(params, src)
    )
    assert cached.shape == recomputed.shape == (3, 20)
    np.testing.assert_array_equal(cached, recomputed)
    assert not (cached == kv_cache.END_ID).any()  # min_length == length: EOS is never picked
    assert len(np.unique(cached)) > 3
    assert kv_cache.first_mismatch(cached, recomputed) is None
    other = cached.copy()
    other[1, 5] = (other[1, 5] + 1) % 32
    assert kv_cache.first_mismatch(cached, other) == 5


def test_markdown_table_of_the_shared_helpers():
    """``experiments/common.py``, which the scripts share: one alignment letter per column."""
    markdown_table = load().markdown_table
    assert markdown_table(("name", "N"), "lr", [("a", 1), ("b", 22)]) == [
        "| name | N |",
        "|---|---:|",
        "| a | 1 |",
        "| b | 22 |",
    ]
    with pytest.raises(ValueError, match="align"):
        markdown_table(("name", "N"), "l", [])
    with pytest.raises(ValueError, match="align"):
        markdown_table(("name", "N"), "lc", [])
