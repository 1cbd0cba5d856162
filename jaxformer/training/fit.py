"""``fit(config, workdir)``: a whole training run, resumable, as ``jaxformer train`` runs it.

    config = load_config("experiments/configs/num2words.py", "demo")
    summary = fit(config, "runs/num2words")      # trains, evaluates, saves; resumes if interrupted
    run = load_run("runs/num2words")             # config, model, best parameters, tokenizers

A workdir holds everything a run needs and makes::

    config.json            the resolved ExperimentConfig (vocabulary sizes filled in)
    tokenizers/            source/ and target/ (trained on the training split)
    checkpoints/           orbax: the last run.keep_checkpoints steps plus the best validation loss
    metrics.jsonl          train/* every run.log_every steps, valid/* at every evaluation
    tensorboard/           the same scalars for TensorBoard
    curves.png             learning curves, drawn at the end
    summary.json           the final evaluation

Running ``fit`` again on a workdir continues from its latest checkpoint: the batches of step s are a
function of s (see ``EpochBatches``) and the dropout key is ``fold_in(seed, s)``, so the continued run
is the uninterrupted one, step for step. A workdir whose stored model, data or optimiser settings
differ from the config given is refused (only ``run.*`` may change, e.g. to train longer).

Devices: ``run.mesh_data`` x ``run.mesh_model`` (``jaxformer.training.sharding.make_mesh``). On a mesh of
more than one device the train state is sharded by ``jaxformer.training.sharding``'s rules, every batch is
split by rows over ``"data"`` and the step is ``make_sharded_train_step``; checkpoints hold whole
arrays, so a run may resume on another mesh (or on one device). A 1 x 1 mesh is the plain
single-device path. Several processes (``initialize_distributed``): each feeds its own slice of the
rows (untested here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer.data import datasets
from jaxformer.decoding.texts import DecodeOptions, corpus_scores, translate_texts
from jaxformer.models.decoder_only import DecoderOnlyLM
from jaxformer.models.encoder_decoder import Transformer
from jaxformer.models.params import init_params
from jaxformer.training import checkpoint as ckpt
from jaxformer.training import sharding as shd
from jaxformer.training.experiment import ExperimentConfig, load_json, save_json, to_dict
from jaxformer.training.metrics import MetricsLog, plot_curves
from jaxformer.training.step import (
    create_train_state,
    evaluate,
    make_eval_step,
    make_train_step,
)


def build_model(config: ExperimentConfig) -> Transformer | DecoderOnlyLM:
    return Transformer(config.model) if config.task == "translate" else DecoderOnlyLM(config.model)


@functools.lru_cache(maxsize=8)
def _eval_step(model):
    return make_eval_step(model)


@functools.lru_cache(maxsize=8)
def _train_step(model, optim):
    """One jit-compiled step per (model, optimiser) settings and process: a resumed or repeated
    run in the same process (tests, notebooks) reuses the compiled programs."""
    return make_train_step(model, optim)


@functools.lru_cache(maxsize=8)
def _sharded_train_step(model, optim, mesh: Mesh):
    """``_train_step`` on a mesh of several devices (the state's shardings follow from its shape)."""
    abstract = jax.eval_shape(lambda: create_train_state(model, jax.random.key(0), optim))
    return shd.make_sharded_train_step(model, optim, mesh, abstract)


def make_run_mesh(config: ExperimentConfig) -> Mesh:
    """The ``run.mesh_data`` x ``run.mesh_model`` mesh; a ValueError naming the keys if it does not
    fit the devices or the batch."""
    run = config.run
    keys = f"run.mesh_data={run.mesh_data}, run.mesh_model={run.mesh_model}"
    try:
        mesh = shd.make_mesh(run.mesh_data, run.mesh_model)
    except ValueError as error:
        raise ValueError(f"{keys} do not fit the {jax.device_count()} device(s): {error}") from None
    if run.batch_size % mesh.shape["data"]:
        raise ValueError(
            f"{keys}: run.batch_size ({run.batch_size}) must be a multiple of the mesh's data axis "
            f"({mesh.shape['data']})"
        )
    return mesh


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict:
    """``batch`` on ``mesh``: rows split over ``"data"`` when they divide evenly, else replicated
    (a held-out batch of any size); unchanged without a mesh or on one device."""
    if mesh is None or mesh.size == 1:
        return batch
    rows = len(next(iter(batch.values())))
    if rows % mesh.shape["data"]:
        return jax.device_put(batch, NamedSharding(mesh, PartitionSpec()))
    if jax.process_count() > 1:  # every process holds the global batch: pass it its own rows
        per = rows // jax.process_count()
        start = jax.process_index() * per
        batch = {k: v[start : start + per] for k, v in batch.items()}
    return shd.shard_batch(batch, mesh)


@dataclasses.dataclass
class Data:
    """Everything ``fit`` reads: tokenizers, the batches of each step, held-out sets."""

    source_tokenizer: Any
    target_tokenizer: Any
    train: datasets.EpochBatches
    valid_batches: list[dict[str, np.ndarray]]
    valid_pairs: list[tuple[str, str]]  # translation: decoded for BLEU / exact match
    test_pairs: list[tuple[str, str]]
    test_batches: list[dict[str, np.ndarray]]


def prepare(config: ExperimentConfig, workdir: Path) -> tuple[ExperimentConfig, Data]:
    """Loads the corpus, fits (or reloads) tokenizers, sets the vocabulary sizes in the config."""
    data, run = config.data, config.run
    if config.task == "translate":
        split = datasets.text_pairs(data)
        src_tok, tgt_tok = datasets.tokenizers(
            data,
            workdir,
            [s for s, _ in split.train],
            [t for _, t in split.train],
            shared=config.model.share_embeddings,
        )
        assert src_tok is not None
        model = config.model.replace(
            vocab_size=tgt_tok.vocab_size, src_vocab_size=src_tok.vocab_size
        )
        train_ids = datasets.token_pairs(split.train, src_tok, tgt_tok)

        def held_out(pairs):
            settings = datasets.batch_config(data, run.batch_size, train=False)
            batches, _ = datasets.bucket_batches(
                datasets.token_pairs(pairs, src_tok, tgt_tok), settings, seed=None
            )
            return [datasets.as_arrays(b) for b in batches]

        # Held-out examples over the length limit are left out of the loss (and counted in the
        # summary), never truncated; BLEU / exact match decode every held-out example.
        limit = data.max_length - 1
        fits = lambda p: len(src_tok.encode(p[0])) <= limit and len(tgt_tok.encode(p[1])) <= limit
        return config.replace(model=model), Data(
            src_tok,
            tgt_tok,
            datasets.translation_batches(train_ids, data, run.batch_size),
            held_out([p for p in split.valid if fits(p)]),
            split.valid,
            split.test,
            held_out([p for p in split.test if fits(p)]),
        )
    split_text = datasets.text_stream(data)
    _, tok = datasets.tokenizers(data, workdir, None, [split_text.train], shared=False)
    model = config.model.replace(vocab_size=tok.vocab_size, src_vocab_size=None)

    def windows(text):
        w = datasets.lm_windows(tok.encode(text), data.max_length, run.batch_size, seed=None)
        return [{"ids": b[:, :-1], "targets": b[:, 1:]} for b in w]

    return config.replace(model=model), Data(
        None,
        tok,
        datasets.lm_batches(tok.encode(split_text.train), data, run.batch_size),
        windows(split_text.valid),
        [],
        [],
        windows(split_text.test),
    )


def _check_same_run(stored: ExperimentConfig, config: ExperimentConfig, workdir: Path) -> None:
    old, new = to_dict(stored), to_dict(config)
    changed = [
        f"{section}.{key}: {old[section][key]!r} -> {new[section][key]!r}"
        for section in ("data", "model", "optim")
        for key in old[section]
        if old[section][key] != new[section][key]
    ]
    if old["task"] != new["task"]:
        changed.insert(0, f"task: {old['task']} -> {new['task']}")
    if changed:
        raise ValueError(
            f"{workdir} holds a run with other settings (only run.* may change on resume); use a "
            "new --workdir or the stored config. Differences:\n  " + "\n  ".join(changed)
        )


def evaluate_run(
    config: ExperimentConfig,
    model,
    params,
    data: Data,
    *,
    split: str = "valid",
    examples: int | None = None,
    options: DecodeOptions | None = None,
    decode: bool = True,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Held-out loss, perplexity, bits per token and token accuracy; for translation (if ``decode``),
    BLEU and exact match of ``options`` (default: the run's beam) on the first ``examples`` pairs.
    With ``mesh`` (and ``params`` sharded on it), the held-out batches are placed on it too."""
    batches = data.valid_batches if split == "valid" else data.test_batches
    batches = [place_batch(b, mesh) for b in batches]
    out = evaluate(_eval_step(model), params, batches)
    metrics = {k: out[k] for k in ("loss", "perplexity", "accuracy")}
    metrics["bits_per_token"] = out["loss"] / math.log(2)
    if config.task == "translate" and decode:
        pairs = data.valid_pairs if split == "valid" else data.test_pairs
        pairs = pairs[: examples or len(pairs)]
        options = options or DecodeOptions(
            beam_size=config.run.beam_size,
            length_penalty=config.run.length_penalty,
            max_length=config.run.decode_max_length,
        )
        outputs = translate_texts(
            model,
            params,
            data.source_tokenizer,
            data.target_tokenizer,
            [s for s, _ in pairs],
            options,
            truncate=True,
        )
        metrics |= corpus_scores([o.texts[0] for o in outputs], [t for _, t in pairs])
    return metrics


def _progress(config: ExperimentConfig, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.run.train_steps,
        initial=start,
        disable=not config.run.progress,
        unit="step",
        dynamic_ncols=True,
        desc="training",
    )


def fit(config: ExperimentConfig, workdir: str | Path) -> dict[str, Any]:
    """Trains (or continues) the run in ``workdir``; returns the final summary (also summary.json)."""
    workdir = Path(workdir)
    mesh = make_run_mesh(config)  # before any work: a mesh that does not fit fails at once
    sharded = mesh.size > 1
    workdir.mkdir(parents=True, exist_ok=True)
    config, data = prepare(config, workdir)
    if (workdir / "config.json").is_file():
        _check_same_run(load_json(workdir / "config.json"), config, workdir)
    save_json(config, workdir / "config.json")

    stats = data.train.stats
    if stats is not None and (stats.dropped_too_long or stats.dropped_empty):
        print(
            f"jaxformer: training on {stats.examples} pairs; left out {stats.dropped_too_long} "
            f"longer than data.max_length={config.data.max_length} tokens (BOS/EOS included) and "
            f"{stats.dropped_empty} with an empty side",
            file=sys.stderr,
        )
    model = build_model(config)
    state = create_train_state(model, jax.random.key(config.optim.seed), config.optim)
    if sharded:
        state = shd.shard_params(state, mesh)
    manager = ckpt.make_manager(workdir / "checkpoints", keep=config.run.keep_checkpoints)
    if manager.latest_step() is not None:
        # The abstract state carries the shardings, so a checkpoint of any mesh (or of one device)
        # is read straight into this run's layout.
        state = ckpt.restore_latest(manager, ckpt.abstract_state(state))
        if not sharded:
            # Restored arrays are committed to their device, fresh ones are not, and jit keys its
            # cache on that: without this a resumed run would compile every step shape once more.
            # (Sharded, fresh and restored arrays are both committed to the same shardings.)
            state = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), state)
    start = int(state.step)
    if sharded:
        train_step = _sharded_train_step(model, config.optim, mesh)
    else:
        train_step = _train_step(model, config.optim)
    run = config.run
    stop_reason = "train_steps"

    def evaluation(step: int, decode: bool) -> dict[str, float]:
        metrics = evaluate_run(
            config,
            model,
            state.params,
            data,
            examples=run.eval_examples,
            decode=decode,
            mesh=mesh if sharded else None,
        )
        log.write(step, {f"valid/{k}": v for k, v in metrics.items()})
        return metrics

    with MetricsLog(workdir) as log:
        bar = _progress(config, start)
        began = time.perf_counter()
        window = {"loss": 0.0, "accuracy": 0.0, "tokens": 0.0, "n": 0, "t": time.perf_counter()}
        step = start
        metrics: dict[str, float] = {}
        while step < run.train_steps:
            batch = data.train(step)
            state, out = train_step(state, place_batch(batch, mesh if sharded else None))
            step += 1
            if step % run.log_every == 0 or step == run.train_steps:
                out = jax.device_get(out)  # the only host sync of a logging interval
            window["n"] += 1
            for name in ("loss", "accuracy", "tokens"):
                window[name] = window[name] + out[name]  # device scalars add up without a sync
            bar.update(1)
            elapsed = (time.perf_counter() - began) / 60
            out_of_time = run.max_minutes is not None and elapsed >= run.max_minutes
            if step % run.log_every == 0 or step == run.train_steps or out_of_time:
                totals = jax.device_get({k: window[k] for k in ("loss", "accuracy", "tokens")})
                seconds = time.perf_counter() - window["t"]
                scalars = {
                    "train/loss": float(totals["loss"]) / window["n"],
                    "train/accuracy": float(totals["accuracy"]) / window["n"],
                    "train/tokens_per_s": float(totals["tokens"]) / seconds,
                    "train/learning_rate": float(out["learning_rate"]),
                    "train/grad_norm": float(out["grad_norm"]),
                }
                log.write(step, scalars)
                bar.set_postfix(
                    loss=f"{scalars['train/loss']:.3f}",
                    tok_s=f"{scalars['train/tokens_per_s']:.0f}",
                )
                window = {"loss": 0.0, "accuracy": 0.0, "tokens": 0.0, "n": 0}
                window["t"] = time.perf_counter()
            last = step == run.train_steps or out_of_time
            if step % run.eval_every == 0 or step % run.checkpoint_every == 0 or last:
                decode = config.task == "translate" and (step % run.eval_every == 0 or last)
                metrics = evaluation(step, decode)
                if step % run.checkpoint_every == 0 or last:
                    ckpt.save(manager, step, state, {"valid_loss": metrics["loss"]})
                window["t"] = time.perf_counter()  # evaluation time is not training time
            if out_of_time:
                stop_reason = f"run.max_minutes={run.max_minutes}"
                break
        bar.close()
    manager.close()
    summary = {
        "workdir": str(workdir),
        "step": step,
        "stopped_by": stop_reason,
        "train_minutes": (time.perf_counter() - began) / 60,
        "checkpoint": str(workdir / "checkpoints" / str(step)),
        "data": None if stats is None else dataclasses.asdict(stats),
        "valid": metrics,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if run.plot and (workdir / "metrics.jsonl").is_file():
        plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", title=str(workdir))
    return summary


@dataclasses.dataclass
class Run:
    """A trained run, ready for inference."""

    config: ExperimentConfig
    model: Transformer | DecoderOnlyLM
    params: Any
    source_tokenizer: Any
    target_tokenizer: Any
    step: int


def checkpoint_steps(workdir: str | Path) -> tuple[list[int], int | None]:
    """``(all saved steps, the best step by validation loss)`` of a workdir."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir} ({directory} does not exist)")
    with _quiet_absl():  # orbax warns that a read-only manager will not save
        manager = ckpt.make_manager(directory, read_only=True)
    try:
        return sorted(manager.all_steps()), manager.best_step()
    finally:
        manager.close()


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_run(workdir: str | Path, step: int | str = "best") -> Run:
    """The config, model, parameters (``"best"``, ``"latest"`` or a step) and tokenizers of a run.

    The parameters are checked against the stored config's model before they are used: a
    checkpoint of another model raises a ValueError listing the differences.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir {workdir} does not exist")
    config = load_json(workdir / "config.json")
    steps, best = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    if step == "best":
        step = best if best is not None else steps[-1]
    elif step == "latest":
        step = steps[-1]
    elif not isinstance(step, int):
        raise ValueError(f"step must be 'best', 'latest' or an int, got {step!r}")
    model = build_model(config)
    abstract = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
    with _quiet_absl():
        params = ckpt.restore_params(workdir / "checkpoints", abstract, step=step)
    src_tok, tgt_tok = datasets.load_tokenizers(workdir, config.task)
    return Run(config, model, params, src_tok, tgt_tok, int(step))
