"""``jaxformer.training.fit.fit`` end to end on the smoke configs: files, logs, exact resume, refusals."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxformer.data import datasets
from jaxformer.training.experiment import load_config, override
from jaxformer.training.fit import TrainingInterrupted, fit
from jaxformer.training.metrics import read_jsonl, series
from jaxformer.training.runs import checkpoint_steps, load_run

from helpers import EXPERIMENTS

NUM2WORDS = EXPERIMENTS / "configs" / "num2words.py"


def smoke(*assignments):
    return override(load_config(NUM2WORDS, "smoke"), list(assignments))


SETTINGS = ["run.log_every=1", "run.eval_every=6", "run.checkpoint_every=6"]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """One uninterrupted run of 12 steps, and one stopped at 6 and continued to 12. Between the two
    parts, lines for steps 7 and 8 are appended to the log, as a process killed after logging them
    (but before its next checkpoint) leaves it; the continued run replays those steps."""
    root = tmp_path_factory.mktemp("fit")
    whole = fit(smoke("run.train_steps=12", *SETTINGS), root / "whole")
    first = fit(smoke("run.train_steps=6", *SETTINGS), root / "resumed")
    with (root / "resumed" / "metrics.jsonl").open("a") as log:
        for step in (7, 8):
            log.write(json.dumps({"step": step, "time": 0.0, "train/loss": 99.0}) + "\n")
        log.write('{"step": 9, "time": 0.')  # cut short by the kill
    resumed = fit(smoke("run.train_steps=12", *SETTINGS), root / "resumed")
    return root, whole, first, resumed


def test_workdir_holds_config_tokenizers_checkpoints_logs_and_curves(runs):
    root, whole, _, _ = runs
    workdir = root / "whole"
    for name in ("config.json", "summary.json", "metrics.jsonl", "curves.png"):
        assert (workdir / name).is_file(), name
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "tokenizers" / "source" / "tokenizer.json").is_file()
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"train/loss" in events[0].read_bytes()
    assert b"valid/bleu" in events[0].read_bytes()
    records = read_jsonl(workdir / "metrics.jsonl")
    steps, losses = series(records, "train/loss")
    assert steps == list(range(1, 13)) and all(np.isfinite(losses))
    assert series(records, "valid/exact_match")[0] == [6, 12]
    assert whole["step"] == 12 and whole["stopped_by"] == "train_steps"
    assert json.loads((workdir / "summary.json").read_text())["valid"] == whole["valid"]
    # The config stored with the run has the vocabulary sizes of its tokenizers.
    run = load_run(workdir)
    assert run.config.model.vocab_size == run.target_tokenizer.vocab_size
    assert run.config.model.src_vocab_size == run.source_tokenizer.vocab_size


def test_resumed_run_equals_uninterrupted_run_step_for_step(runs):
    root, whole, first, resumed = runs
    assert first["step"] == 6 and resumed["step"] == 12
    a = read_jsonl(root / "whole" / "metrics.jsonl")
    b = read_jsonl(root / "resumed" / "metrics.jsonl")
    for name in ("train/loss", "train/accuracy", "train/grad_norm", "valid/loss", "valid/bleu"):
        assert series(a, name) == series(b, name), name
    assert whole["valid"] == resumed["valid"]
    # The replayed steps are logged once, and only by the continued run: the log equals the
    # uninterrupted run's line for line (but for the times).
    timing = ("time", "train/tokens_per_s")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]
    assert strip(b) == strip(a)
    # And the parameters themselves.
    pa, pb = load_run(root / "whole", "latest").params, load_run(root / "resumed", "latest").params
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, pa, pb)))


def test_rerunning_a_finished_run_changes_nothing(runs, capsys):
    root, whole, _, _ = runs
    workdir = root / "whole"
    before = {name: (workdir / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    again = fit(smoke("run.train_steps=12", *SETTINGS), workdir)
    assert again == json.loads(before["summary.json"]) and again["valid"] == whole["valid"]
    assert {name: (workdir / name).read_bytes() for name in before} == before
    assert "trained to step 12 already" in capsys.readouterr().err


def test_ctrl_c_saves_the_step_reached_and_the_rerun_continues_it(
    runs, tmp_path, monkeypatch, capsys
):
    root, whole, _, _ = runs
    batches = datasets.EpochBatches.__call__

    def interrupting(self, step):  # Ctrl-C while the batch of step 8 is made
        if step == 8:
            raise KeyboardInterrupt
        return batches(self, step)

    monkeypatch.setattr(datasets.EpochBatches, "__call__", interrupting)
    config = smoke("run.train_steps=12", *SETTINGS)
    with pytest.raises(TrainingInterrupted) as interrupted:
        fit(config, tmp_path / "run")
    assert interrupted.value.step == interrupted.value.saved_step == 8
    message = "interrupted at step 8, saved; run the same command to resume"
    assert message in str(interrupted.value) and message in capsys.readouterr().err
    assert checkpoint_steps(tmp_path / "run")[0] == [6, 8]
    assert not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.setattr(datasets.EpochBatches, "__call__", batches)
    resumed = fit(config, tmp_path / "run")
    assert resumed["step"] == 12 and resumed["valid"] == whole["valid"]
    pa, pb = load_run(root / "whole", "latest").params, load_run(tmp_path / "run", "latest").params
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, pa, pb)))


def test_a_workdir_refuses_other_model_or_data_settings(runs):
    root, _, _, _ = runs
    with pytest.raises(ValueError, match=r"model.d_model: 32 -> 48"):
        fit(smoke("run.train_steps=13", "model.d_model=48"), root / "whole")
    with pytest.raises(ValueError, match=r"data.max_value: 999 -> 998"):
        fit(smoke("run.train_steps=13", "data.max_value=998"), root / "whole")
    # Refused before anything is written: a run of other data keeps its tokenizers untouched.
    other = root / "other"
    other.mkdir()
    config = smoke("data.language=en")
    (other / "config.json").write_text((root / "whole" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"data.language: 'ru' -> 'en'"):
        fit(config, other)
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]


def test_checkpoint_of_another_model_is_refused(runs, tmp_path):
    root, _, _, _ = runs
    workdir = tmp_path / "copy"
    shutil.copytree(root / "whole", workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["ffn_dim"] = 96
    (workdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match the expected parameters"):
        load_run(workdir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        shutil.rmtree(workdir / "checkpoints")
        load_run(workdir)


def test_best_and_latest_checkpoints(runs):
    root, _, _, _ = runs
    records = read_jsonl(root / "whole" / "metrics.jsonl")
    steps, losses = series(records, "valid/loss")
    assert load_run(root / "whole", "latest").step == 12
    assert load_run(root / "whole", "best").step == steps[int(np.argmin(losses))]
    assert load_run(root / "whole", 6).step == 6


def test_max_minutes_stops_early_and_saves_and_dropped_examples_are_reported(tmp_path, capsys):
    config = smoke("run.train_steps=1000", "run.max_minutes=0.0001", "data.max_length=16")
    summary = fit(config, tmp_path / "short")
    # The clock is read after each (asynchronously dispatched) step: with the step already compiled
    # by an earlier test in this process, the first ones can return within 6 ms, so the run stops
    # after one step or a few, not after the 1000 asked for.
    assert summary["stopped_by"] == "run.max_minutes=0.0001"
    assert 1 <= summary["step"] < 1000
    assert load_run(tmp_path / "short", "latest").step == summary["step"]  # saved where it stopped
    # Targets of 15+ characters do not fit 16 tokens with BOS/EOS: left out, and said so.
    data = summary["data"]
    assert data["dropped_too_long"] > 0 and data["examples"] > 0
    assert f"left out {data['dropped_too_long']} longer than data.max_length=16" in (
        capsys.readouterr().err
    )


def test_a_run_compiles_one_train_step_per_length_bucket(runs):
    from jaxformer.data.datasets import LENGTH_STEP
    from jaxformer.training.fit import _train_step, prepare
    from jaxformer.training.runs import build_model

    root, _, _, _ = runs
    config, data = prepare(smoke(), root / "whole")
    shapes = {
        tuple(v.shape for v in data.train(step).values()) for step in range(data.train.per_epoch)
    }
    # Sources of <= 3 digits fit one bucket; targets of <= 31 characters two.
    assert 1 < len(shapes) <= 2 and all(s[0][1] % LENGTH_STEP == 0 for s in shapes)
    step_fn = _train_step(build_model(config), config.optim)
    assert step_fn._cache_size() == len(shapes)  # the 24 steps above compiled only these
