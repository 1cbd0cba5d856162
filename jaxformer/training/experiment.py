"""Experiment configurations: frozen dataclasses, Python config files and ``--set key=value`` overrides.

An experiment is one ``ExperimentConfig``: what to train on (``data``), the model (``model``, a
``TransformerConfig``), the optimiser (``optim``, a ``TrainConfig``) and how long / how often to
evaluate and save (``run``). A config file is a small Python file with ``get_config(variant)``
returning one (``experiments/configs/*.py``, as the flax examples do)::

    config = load_config("experiments/configs/num2words.py", variant="smoke")
    config = override(config, ["run.train_steps=200", "model.d_model=128"])

Overrides name a field by its dotted path; the value is parsed as a Python literal (``128``,
``0.1``, ``'bpe'``, ``None``, ``True``) or, for a string field, taken as written; a boolean field
also takes ``true``/``false``, ``yes``/``no`` and ``on``/``off`` in any case. An unknown key raises a
``ValueError`` that suggests the nearest keys and lists them all; a value of the wrong type raises
one that names the type expected. The resolved config is
stored with the run (``workdir/config.json``) so inference rebuilds the same model.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from jaxformer.data.config import DataConfig, check_literal
from jaxformer.models.config import TransformerConfig
from jaxformer.training.step import TrainConfig

Task = Literal["translate", "lm"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length of the run, evaluation, checkpoints and logging."""

    batch_size: int = 64
    train_steps: int = 10_000
    max_minutes: float | None = None  # stop early (and save) once this much training time passed
    eval_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # the last N are kept, plus the best by validation loss
    log_every: int = 50
    eval_examples: int = 500  # held-out examples decoded for BLEU / exact match at each evaluation
    beam_size: int = 4  # beam used for the evaluation's BLEU / exact match
    # GNMT length penalty of that beam. 0 (OpenNMT-tf's default) lets label-smoothed models end
    # long outputs early: every token costs at least -log(1 - smoothing), an early EOS only once.
    length_penalty: float = 0.6
    decode_max_length: int = 128
    progress: bool = True  # tqdm progress bar on stderr
    plot: bool = True  # learning curves PNG at the end
    # The device mesh of ``jaxformer.training.sharding``: batch rows split over mesh_data devices (-1: all
    # the devices mesh_model leaves), heads and feed-forward width over mesh_model. 1 x 1 trains on
    # one device. Not part of the run's identity: a workdir may resume on another mesh.
    mesh_data: int = 1
    mesh_model: int = 1

    def __post_init__(self):
        for name in ("batch_size", "train_steps", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.beam_size < 1:
            raise ValueError(f"run.beam_size must be >= 1, got {self.beam_size}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"run.max_minutes must be None or > 0, got {self.max_minutes}")
        if self.mesh_data < 1 and self.mesh_data != -1:
            raise ValueError(
                f"run.mesh_data must be >= 1 or -1 (all devices), got {self.mesh_data}"
            )
        if self.mesh_model < 1:
            raise ValueError(f"run.mesh_model must be >= 1, got {self.mesh_model}")
        if self.mesh_data > 0 and self.batch_size % self.mesh_data:
            raise ValueError(
                f"run.batch_size ({self.batch_size}) must be a multiple of run.mesh_data "
                f"({self.mesh_data}): each data shard takes batch_size / mesh_data rows"
            )

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    task: Task = "translate"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    optim: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self):
        check_literal(self, "task", Task)
        wants = "shakespeare" if self.task == "lm" else ("numbers", "bible")
        if self.data.corpus not in wants:
            raise ValueError(f"task {self.task!r} cannot train on data.corpus={self.data.corpus!r}")

    def replace(self, **changes) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)


# --- config files --------------------------------------------------------------------------------


def load_config(path: str | Path, variant: str = "default") -> ExperimentConfig:
    """Calls ``get_config(variant)`` of the Python file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no config file {path}")
    spec = importlib.util.spec_from_file_location(f"jaxformer_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config: {path} defines no get_config(variant)")
    config = module.get_config(variant)
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"--config: {path}: get_config must return an ExperimentConfig")
    return config


# --- overrides -----------------------------------------------------------------------------------


def keys(config: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of ``config`` (leaves only)."""
    out = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            out += keys(value, f"{prefix}{field.name}.")
        else:
            out.append(f"{prefix}{field.name}")
    return out


# Words a boolean field accepts besides the Python literals True / False (compared lower-cased).
BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _coerce(key: str, text: str, annotation: Any) -> Any:
    allowed = _allowed_types(annotation)
    if bool in allowed and text.lower() in BOOL_WORDS:
        return BOOL_WORDS[text.lower()]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed:
        if int not in allowed:
            value = float(value)
    if str in allowed and not isinstance(value, str) and value is not None:
        value = text  # "ru", "4" for a string field stays a string
    if not isinstance(value, tuple(allowed)) or (isinstance(value, bool) and bool not in allowed):
        names = sorted({t.__name__ for t in allowed})
        words = " (true/false)" if bool in allowed else ""
        raise ValueError(f"--set {key}={text}: expected {' or '.join(names)}{words}")
    return value


def _allowed_types(annotation: Any) -> set[type]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin in (typing.Union, types.UnionType):
        out: set[type] = set()
        for arg in typing.get_args(annotation):
            out |= _allowed_types(arg)
        return out
    if annotation is None or annotation is type(None):
        return {type(None)}
    return {annotation}


def override(config: ExperimentConfig, assignments: list[str]) -> ExperimentConfig:
    """``config`` with each ``key=value`` applied (dotted keys; see the module docstring)."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set expects key=value, got {assignment!r}")
        if key not in keys(config):
            raise ValueError(
                f"--set: unknown config key {key!r}{_suggest(key, keys(config))}; "
                f"known keys: {', '.join(keys(config))}"
            )
        config = _set(config, key.split("."), text.strip(), key)
    return config


def _suggest(key: str, known: list[str]) -> str:
    """``" (did you mean 'a.b'?)"`` naming the keys nearest ``key`` by spelling, of the whole key
    or of its last part (``train_steps`` -> ``run.train_steps``), or ``""`` when none is near."""
    last = key.rsplit(".", 1)[-1]

    def likeness(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        part = difflib.SequenceMatcher(None, last, candidate.rsplit(".", 1)[-1]).ratio()
        return max(whole, part)

    scored = sorted(((likeness(k), k) for k in known), key=lambda sk: -sk[0])
    if not scored or scored[0][0] < 0.75:
        return ""
    best = scored[0][0]
    near = [k for score, k in scored if score >= best - 0.05][:3]
    return " (did you mean " + " or ".join(repr(k) for k in near) + "?)"


def _set(obj: Any, path: list[str], text: str, key: str) -> Any:
    if len(path) > 1:
        value = _set(getattr(obj, path[0]), path[1:], text, key)
    else:  # get_type_hints resolves the postponed (string) annotations of each module
        value = _coerce(key, text, typing.get_type_hints(type(obj))[path[0]])
    try:
        return dataclasses.replace(obj, **{path[0]: value})
    except (ValueError, TypeError) as error:
        raise ValueError(f"--set {key}={text}: {error}") from error


# --- JSON ----------------------------------------------------------------------------------------


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Inverse of ``to_dict``; unknown keys raise (a config from another version of jaxformer)."""
    sections = {
        "data": DataConfig,
        "model": TransformerConfig,
        "optim": TrainConfig,
        "run": RunConfig,
    }
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in sections:
            known = {f.name for f in dataclasses.fields(sections[name])}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"config section {name!r} has unknown keys {unknown}")
            kwargs[name] = sections[name](**value)
        elif name == "task":
            kwargs[name] = value
        else:
            raise ValueError(f"config has an unknown section {name!r}")
    return ExperimentConfig(**kwargs)


def save_json(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load_json(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run config {path}: is this a jaxformer workdir?")
    return from_dict(json.loads(path.read_text()))
