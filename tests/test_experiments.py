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
