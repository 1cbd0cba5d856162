"""Where a run's numbers go: JSONL (one object per line), TensorBoard event files, a PNG at the end.

    with MetricsLog(workdir) as log:
        log.write(step, {"train/loss": 2.3, "train/tokens_per_s": 5100.0})
        log.write(step, {"valid/loss": 2.1, "valid/bleu": 12.5})
    plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")

``metrics.jsonl`` lines look like ``{"step": 100, "time": 12.3, "train/loss": 2.31}``: ``time`` is the
wall-clock seconds since the log was opened (training time, across resumes it restarts at 0). The
TensorBoard events (``workdir/tensorboard``, written with tensorboardX, so no TensorFlow is needed)
hold the same scalars: ``tensorboard --logdir workdir/tensorboard``.

A run continued from a checkpoint at step s replays the steps after s that a killed process may have
logged already: ``MetricsLog(workdir, resume_from=s)`` drops those lines from ``metrics.jsonl`` (and
has TensorBoard hide their events), so every step is logged once.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends scalars to ``workdir/metrics.jsonl`` and to TensorBoard; a context manager."""

    def __init__(
        self, workdir: str | Path, tensorboard: bool = True, *, resume_from: int | None = None
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "metrics.jsonl"
        if resume_from is not None and self.path.is_file():
            _keep_up_to(self.path, resume_from)
        self._file = self.path.open("a")
        self._start = time.perf_counter()
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard discards the earlier events of the steps logged again.
            purge = None if resume_from is None else resume_from + 1
            self._writer = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        record: dict[str, Any] = {"step": int(step), "time": time.perf_counter() - self._start}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)  # JSON has no nan/inf
            if self._writer is not None:
                self._writer.add_scalar(name, value, int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _keep_up_to(path: Path, step: int) -> None:
    """Rewrites ``path`` without the records of steps after ``step`` (replaced atomically); a line
    cut short by a killed process is dropped too."""

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and keep(line)]
    if kept == lines:
        return
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(kept))
    os.replace(partial, path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (``"nan"``/``"inf"`` strings back to floats)."""
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records.append(
                {k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in record.items()}
            )
    return records


def series(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one metric; a later record for a step (after a resume) wins."""
    by_step = {r["step"]: r[name] for r in records if name in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(jsonl: str | Path, png: str | Path, title: str | None = None) -> Path:
    """Training and validation loss (and every other ``valid/`` metric) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl)
    valid = sorted({k for r in records for k in r if k.startswith("valid/") and k != "valid/loss"})
    fig, axes = plt.subplots(1, 1 + len(valid), figsize=(5 * (1 + len(valid)), 3.6), squeeze=False)
    loss_ax = axes[0, 0]
    for name, label in (("train/loss", "train (smoothed labels)"), ("valid/loss", "valid")):
        steps, values = series(records, name)
        if steps:
            loss_ax.plot(steps, values, label=label, marker="o" if name == "valid/loss" else None)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss per token (nats)")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    for ax, name in zip(axes[0, 1:], valid, strict=True):
        steps, values = series(records, name)
        ax.plot(steps, values, marker="o")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
