"""A trained run read back from its workdir: ``load_run``, ``Run``, ``checkpoint_steps``.

    run = load_run("runs/num2words")           # "best" (validation loss), "latest" or a step
    run.model, run.params, run.source_tokenizer, run.target_tokenizer, run.config, run.step
    steps, best = checkpoint_steps("runs/num2words")

Inference, the CLI and the experiments read runs through this module; ``jaxformer.training.fit``
writes them. ``check_same_run`` is the test both use before a workdir is reused: only ``run.*`` may
differ between the stored config and a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax

from jaxformer.data import datasets
from jaxformer.models.decoder_only import DecoderOnlyLM
from jaxformer.models.encoder_decoder import Transformer
from jaxformer.models.params import init_params
from jaxformer.training import checkpoint as ckpt
from jaxformer.training.experiment import ExperimentConfig, load_json, to_dict

# Filled in from the tokenizers by ``fit``: a new config's values of these mean nothing yet.
DERIVED = {("model", "vocab_size"), ("model", "src_vocab_size")}


def build_model(config: ExperimentConfig) -> Transformer | DecoderOnlyLM:
    """The model of ``config``: an encoder-decoder for ``task="translate"``, else a decoder-only LM."""
    return Transformer(config.model) if config.task == "translate" else DecoderOnlyLM(config.model)


@dataclasses.dataclass
class Run:
    """A trained run, ready for inference."""

    config: ExperimentConfig
    model: Transformer | DecoderOnlyLM
    params: Any
    source_tokenizer: Any
    target_tokenizer: Any
    step: int


def config_differences(
    stored: ExperimentConfig, config: ExperimentConfig, *, derived: bool = True
) -> list[str]:
    """``"section.key: old -> new"`` for every task, data, model or optimiser setting that differs
    (``run.*`` may change). ``derived=False`` leaves out the vocabulary sizes (see ``DERIVED``)."""
    old, new = to_dict(stored), to_dict(config)
    changed = [] if old["task"] == new["task"] else [f"task: {old['task']} -> {new['task']}"]
    for section in ("data", "model", "optim"):
        for key in old[section]:
            if not derived and (section, key) in DERIVED:
                continue
            if old[section].get(key) != new[section].get(key):
                changed.append(
                    f"{section}.{key}: {old[section][key]!r} -> {new[section].get(key)!r}"
                )
    return changed


def check_same_run(
    workdir: str | Path, config: ExperimentConfig, *, derived: bool = True
) -> ExperimentConfig | None:
    """The config stored in ``workdir`` (None if it has none); a ValueError listing the differences
    if it is another run than ``config`` (see ``config_differences``)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    stored = load_json(path)
    changed = config_differences(stored, config, derived=derived)
    if changed:
        raise ValueError(
            f"{workdir} holds a run with other settings (only run.* may change on resume); use a "
            "new --workdir or the stored config. Differences:\n  " + "\n  ".join(changed)
        )
    return stored


@contextlib.contextmanager
def quiet_absl():
    """Silences absl's warnings (orbax warns that a read-only manager will not save)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def checkpoint_steps(workdir: str | Path) -> tuple[list[int], int | None]:
    """``(all saved steps, the best step by validation loss)`` of a workdir."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir} ({directory} does not exist)")
    with quiet_absl():
        manager = ckpt.make_manager(directory, read_only=True)
    try:
        return sorted(manager.all_steps()), manager.best_step()
    finally:
        manager.close()


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
    with quiet_absl():
        params = ckpt.restore_params(workdir / "checkpoints", abstract, step=step)
    src_tok, tgt_tok = datasets.load_tokenizers(workdir, config.task)
    return Run(config, model, params, src_tok, tgt_tok, int(step))


__all__ = [
    "Run",
    "build_model",
    "check_same_run",
    "checkpoint_steps",
    "config_differences",
    "load_run",
]
