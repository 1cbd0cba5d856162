"""``fit(config, workdir)``: a whole training run, resumable, as ``jaxformer train`` runs it.

    config = load_config("experiments/configs/num2words.py", "demo")
    summary = fit(config, "runs/num2words")      # trains, evaluates, saves; resumes if interrupted
    run = load_run("runs/num2words")             # jaxformer.training.runs: model, best parameters

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
differ from the config given is refused (only ``run.*`` may change, e.g. to train longer), before
anything is written into it. Lines of ``metrics.jsonl`` past the checkpoint resumed from (logged by
a killed process) are dropped, so the continued log holds each step once; a run already trained to
``run.train_steps`` is left as it is (its summary is returned, not rewritten).

Ctrl-C (SIGINT) stops the loop after the step under way, saves that step and raises
``TrainingInterrupted`` (a ``KeyboardInterrupt``) after printing "interrupted at step N, saved; run
the same command to resume"; ``jaxformer train`` and ``experiments/demo.py`` then exit with 130.

Devices: ``run.mesh_data`` x ``run.mesh_model`` (``jaxformer.training.sharding.make_mesh``). On a mesh of
more than one device the train state is sharded by ``jaxformer.training.sharding``'s rules, every batch is
split by rows over ``"data"`` and the step is ``make_sharded_train_step``; checkpoints hold whole
arrays, so a run may resume on another mesh (or on one device). A 1 x 1 mesh is the plain
single-device path. Several processes (``initialize_distributed``): each feeds its own slice of the
rows (untested here).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer.decoding.texts import DecodeOptions, corpus_scores, translate_texts
from jaxformer.training import checkpoint as ckpt
from jaxformer.training import sharding as shd
from jaxformer.training.experiment import ExperimentConfig, save_json
from jaxformer.training.interrupt import TrainingInterrupted, stop_on_sigint
from jaxformer.training.metrics import MetricsLog, plot_curves
from jaxformer.training.prepare import Data, prepare
from jaxformer.training.runs import build_model, check_same_run
from jaxformer.training.step import (
    create_train_state,
    evaluate,
    make_eval_step,
    make_train_step,
)


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


StopWhen = Callable[[int, dict[str, float]], "str | None"]


@dataclasses.dataclass
class _Loop:
    """What the training loop reads and writes, all bound before it starts."""

    config: ExperimentConfig
    workdir: Path
    model: Any
    data: Data
    mesh: Mesh | None  # None: one device
    manager: Any
    log: MetricsLog
    train_step: Callable
    stop_when: StopWhen | None
    start: int

    def step(self, state, step: int):
        return self.train_step(state, place_batch(self.data.train(step), self.mesh))

    def evaluate(self, state, step: int, decode: bool) -> dict[str, float]:
        metrics = evaluate_run(
            self.config,
            self.model,
            state.params,
            self.data,
            examples=self.config.run.eval_examples,
            decode=decode,
            mesh=self.mesh,
        )
        self.log.write(step, {f"valid/{k}": v for k, v in metrics.items()})
        return metrics

    def save(self, state, step: int, metrics: dict[str, float] | None) -> None:
        best = None if metrics is None else {"valid_loss": metrics["loss"]}
        ckpt.save(self.manager, step, state, best)


@dataclasses.dataclass
class _Position:
    """Where the loop stands: steps done, the latest validation figures, why it stopped."""

    step: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    stopped_by: str | None = None
    began: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def minutes(self) -> float:
        return (time.perf_counter() - self.began) / 60


@dataclasses.dataclass
class _Window:
    """Training figures summed since the last log line (device scalars add up without a sync)."""

    sums: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"loss": 0.0, "accuracy": 0.0, "tokens": 0.0}
    )
    steps: int = 0
    clock: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, out: dict) -> None:
        self.steps += 1
        self.sums = {name: total + out[name] for name, total in self.sums.items()}

    def scalars(self, out: dict) -> dict[str, float]:
        sums, out = jax.device_get((self.sums, out))  # the only host sync of a logging interval
        return {
            "train/loss": float(sums["loss"]) / self.steps,
            "train/accuracy": float(sums["accuracy"]) / self.steps,
            "train/tokens_per_s": float(sums["tokens"]) / (time.perf_counter() - self.clock),
            "train/learning_rate": float(out["learning_rate"]),
            "train/grad_norm": float(out["grad_norm"]),
        }


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


def fit(
    config: ExperimentConfig, workdir: str | Path, *, stop_when: StopWhen | None = None
) -> dict[str, Any]:
    """Trains (or continues) the run in ``workdir``; returns the final summary (also summary.json).

    ``stop_when(step, valid_metrics)``, called after each evaluation, may end the run early by
    returning the reason (a string, stored as the summary's ``stopped_by``). Ctrl-C saves the step
    reached and raises ``TrainingInterrupted``. A run already trained to ``run.train_steps`` is
    left as it is: its stored summary is returned.
    """
    workdir = Path(workdir)
    mesh = make_run_mesh(config)  # before any work: a mesh that does not fit fails at once
    config, data = _open_workdir(config, workdir)
    model = build_model(config)
    manager = ckpt.make_manager(workdir / "checkpoints", keep=config.run.keep_checkpoints)
    try:
        state = _initial_state(config, model, manager, mesh)
        start = int(state.step)
        if start >= config.run.train_steps:
            return _already_trained(config, workdir, model, state, data)
        resume_from = start if (workdir / "metrics.jsonl").exists() else None
        with MetricsLog(workdir, resume_from=resume_from) as log:
            loop = _Loop(
                config=config,
                workdir=workdir,
                model=model,
                data=data,
                mesh=mesh if mesh.size > 1 else None,
                manager=manager,
                log=log,
                train_step=_step_function(config, model, mesh),
                stop_when=stop_when,
                start=start,
            )
            at = _train(loop, state)
    finally:
        manager.close()
    return _write_summary(config, workdir, data, at)


def _open_workdir(config: ExperimentConfig, workdir: Path) -> tuple[ExperimentConfig, Data]:
    """Checks that ``workdir`` holds no other run (before writing anything into it), prepares the
    data and stores the resolved config."""
    workdir.mkdir(parents=True, exist_ok=True)
    check_same_run(workdir, config, derived=False)
    config, data = prepare(config, workdir)
    check_same_run(workdir, config)
    save_json(config, workdir / "config.json")
    stats = data.train.stats
    if stats is not None and (stats.dropped_too_long or stats.dropped_empty):
        print(
            f"jaxformer: training on {stats.examples} pairs; left out {stats.dropped_too_long} "
            f"longer than data.max_length={config.data.max_length} tokens (BOS/EOS included) and "
            f"{stats.dropped_empty} with an empty side",
            file=sys.stderr,
        )
    return config, data


def _initial_state(config: ExperimentConfig, model, manager, mesh: Mesh):
    """A fresh train state, or the latest checkpoint's, in the layout of ``mesh``."""
    sharded = mesh.size > 1
    state = create_train_state(model, jax.random.key(config.optim.seed), config.optim)
    if sharded:
        state = shd.shard_params(state, mesh)
    if manager.latest_step() is None:
        return state
    # The abstract state carries the shardings, so a checkpoint of any mesh (or of one device)
    # is read straight into this run's layout.
    state = ckpt.restore_latest(manager, ckpt.abstract_state(state))
    if not sharded:
        # Restored arrays are committed to their device, fresh ones are not, and jit keys its
        # cache on that: without this a resumed run would compile every step shape once more.
        # (Sharded, fresh and restored arrays are both committed to the same shardings.)
        state = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), state)
    return state


def _step_function(config: ExperimentConfig, model, mesh: Mesh) -> Callable:
    if mesh.size > 1:
        return _sharded_train_step(model, config.optim, mesh)
    return _train_step(model, config.optim)


def _train(loop: _Loop, state) -> _Position:
    """Steps from ``loop.start`` to ``run.train_steps`` (or the time cap, or ``stop_when``):
    logs, evaluates and saves on the way; on Ctrl-C saves the step reached and raises."""
    run = loop.config.run
    at, window = _Position(loop.start), _Window()
    with _progress(loop.config, loop.start) as bar, stop_on_sigint() as stop:
        try:
            while at.stopped_by is None and at.step < run.train_steps:
                state, out = loop.step(state, at.step)
                at.step += 1
                bar.update(1)
                if run.max_minutes is not None and at.minutes >= run.max_minutes:
                    at.stopped_by = f"run.max_minutes={run.max_minutes}"
                window.add(out)
                if at.step % run.log_every == 0 or at.step == run.train_steps or at.stopped_by:
                    scalars = window.scalars(out)
                    loop.log.write(at.step, scalars)
                    bar.set_postfix(loss=f"{scalars['train/loss']:.3f}")
                    window = _Window()
                if _evaluate_and_save(loop, state, at):
                    window.clock = time.perf_counter()  # evaluation time is not training time
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            _save_interrupted(loop, state, at.step)
    at.stopped_by = at.stopped_by or "train_steps"
    return at


def _evaluate_and_save(loop: _Loop, state, at: _Position) -> bool:
    """Evaluates (decoding at ``run.eval_every``) and saves at ``run.checkpoint_every`` and at the
    last step; asks ``stop_when`` after a decoding evaluation. Returns whether it evaluated."""
    run, step = loop.config.run, at.step
    last = step == run.train_steps or at.stopped_by is not None
    evaluate = step % run.eval_every == 0 or last
    save = step % run.checkpoint_every == 0 or last
    if not (evaluate or save):
        return False
    at.metrics = loop.evaluate(state, step, decode=evaluate)
    if evaluate and loop.stop_when is not None and at.stopped_by is None:
        at.stopped_by = loop.stop_when(step, at.metrics)
    if save or at.stopped_by is not None:
        loop.save(state, step, at.metrics)
    return True


def _save_interrupted(loop: _Loop, state, step: int) -> None:
    """Saves ``state`` (the state after ``step`` steps) unless an interrupted update consumed it
    (donated buffers), then raises ``TrainingInterrupted``."""
    intact = not any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state))
    if intact and step > loop.start:
        loop.save(state, step, None)  # no validation figures: never the "best" checkpoint
    error = TrainingInterrupted(loop.workdir, step, loop.manager.latest_step())
    print(f"jaxformer: {error}", file=sys.stderr)
    raise error from None


def _already_trained(config: ExperimentConfig, workdir: Path, model, state, data: Data) -> dict:
    """A rerun of a finished run: its summary, unchanged (written afresh only if missing)."""
    step = int(state.step)
    print(
        f"jaxformer: {workdir} is trained to step {step} already (run.train_steps="
        f"{config.run.train_steps}): nothing to train; raise run.train_steps to train longer",
        file=sys.stderr,
    )
    stored = workdir / "summary.json"
    if stored.is_file():
        return json.loads(stored.read_text())
    metrics = evaluate_run(config, model, state.params, data, examples=config.run.eval_examples)
    at = _Position(step, metrics, "train_steps")
    at.began = time.perf_counter()
    return _write_summary(config, workdir, data, at)


def _write_summary(config: ExperimentConfig, workdir: Path, data: Data, at: _Position) -> dict:
    stats = data.train.stats
    summary = {
        "workdir": str(workdir),
        "step": at.step,
        "stopped_by": at.stopped_by,
        "train_minutes": at.minutes,
        "checkpoint": str(workdir / "checkpoints" / str(at.step)),
        "data": None if stats is None else dataclasses.asdict(stats),
        "valid": at.metrics,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if config.run.plot and (workdir / "metrics.jsonl").is_file():
        plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", title=str(workdir))
    return summary
