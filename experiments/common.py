"""What the experiment scripts share: the machine record, timing, markdown tables, result files.

A script imports it as ``from common import ...``. ``python experiments/NAME.py`` puts this folder on
``sys.path``; a script loaded by its path (the tests do) puts it there itself first:

    sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
PACKAGES = ("jaxformer", "jax", "jaxlib", "flax", "numpy")  # versions recorded in every result


# --- the machine -------------------------------------------------------------------------------------


def machine_info(threads: int | None = None, packages: Sequence[str] = ()) -> dict:
    """The machine a result was measured on: CPU, cores, OS, Python, JAX devices, package versions.

    ``threads``: the threads the run asked for, recorded when given. ``packages``: versions to record
    besides ``PACKAGES`` (None where a package is not installed).
    """
    info = dict(
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        versions=package_versions((*PACKAGES, *packages)),
    )
    if threads is not None:
        info["threads"] = threads
    return info


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    versions = {}
    for package in dict.fromkeys(packages):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none): is the CPU shared?"""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# --- timing ------------------------------------------------------------------------------------------


def timed(fn: Callable, *args) -> tuple[Any, float]:
    """``fn(*args)``, waited for with ``jax.block_until_ready``, and its wall time in seconds."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def timed_runs(fn: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    """The output of ``fn()`` and the seconds of ``repeats`` calls after an untimed first one (compile)."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        out, seconds = timed(fn)
        times.append(seconds)
    return out, times


# --- results -----------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table. ``align``: one letter per column, ``l`` (text) or ``r`` (numbers)."""
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l', 'r' per column ({len(headers)}), got {align!r}")
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [line(headers), rule, *map(line, rows)]


def output_dir(requested: str | pathlib.Path | None, smoke: bool, name: str) -> pathlib.Path:
    """Where a script writes: ``requested``, else a new temp dir for a smoke run, else ``RESULTS_DIR``."""
    if requested is not None:
        return pathlib.Path(requested)
    if smoke:
        return pathlib.Path(tempfile.mkdtemp(prefix=f"{name}_smoke_"))
    return RESULTS_DIR


def write_json(path: str | pathlib.Path, data: Any) -> pathlib.Path:
    """Write ``data`` as indented JSON (creating the folder); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# --- training scripts (lm.py, translate.py) -----------------------------------------------------------


def training_parser(doc: str, default_config: pathlib.Path) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with ``--config`` (a config file,
    ``:variant`` optional), ``--workdir``, ``--set KEY=VALUE`` and ``--json``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", default=str(default_config), help="configs/NAME.py[:variant]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="write the test figures here")
    return parser


def fit_config(parser: argparse.ArgumentParser, args: argparse.Namespace, task: str, other: str):
    """Train ``args.config`` (with ``args.set``) in ``args.workdir``, resuming a run found there.

    A config of another task than ``task`` is a usage error that names the ``other`` script.
    Returns the training summary, the best checkpoint's run and its data.
    """
    # Imported here: the timing scripts (bench_decode's workers) do not load the training stack.
    from jaxformer.training.experiment import load_config, override
    from jaxformer.training.fit import fit, prepare
    from jaxformer.training.runs import load_run

    path, _, variant = args.config.partition(":")
    config = override(load_config(path, variant or "default"), args.set)
    if config.task != task:
        parser.error(f"{path} is a {config.task!r} config; use experiments/{other}")
    summary = fit(config, args.workdir)
    run = load_run(args.workdir, "best")
    _, data = prepare(run.config, pathlib.Path(args.workdir))
    return summary, run, data
