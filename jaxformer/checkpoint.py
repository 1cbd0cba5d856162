"""Thin wrappers over ``orbax.checkpoint.CheckpointManager`` (orbax-checkpoint 0.12).

    manager = make_manager(workdir / "checkpoints", keep=2, best_metric="valid_loss")
    save(manager, step, state, {"valid_loss": 1.7})       # synchronous: on disk when it returns
    state = restore_latest(manager, abstract_state(state))  # resume a run exactly
    params = restore_params(workdir / "checkpoints")         # inference: the parameters only

Retention: the last ``keep`` checkpoints plus the best one by ``best_metric`` (lower is better), as
``AnyPreservationPolicy([LatestN(keep), BestN(1)])``. (``CheckpointManagerOptions(max_to_keep=...,
best_fn=...)`` would instead keep the ``max_to_keep`` *best*, not the last N plus the best; and
``max_to_keep`` is deprecated in favour of ``preservation_policy``.) A checkpoint saved without
metrics is kept by the last-N rule only; every saved ``metrics`` dict must contain ``best_metric``.

The whole ``TrainState`` (step, params, optimizer state, dropout key) is one ``StandardSave`` item,
so restoring it and continuing reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxformer.typing import PyTree


def make_manager(
    directory: str | os.PathLike,
    keep: int = 2,
    best_metric: str | None = "valid_loss",
    *,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """A synchronous manager keeping the last ``keep`` steps plus the best by ``best_metric``."""
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
    if best_metric is not None:
        policies.append(
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=True,  # sorted descending, the last (kept) one is the lowest
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # best_fn / best_mode only serve manager.best_step(); the policy above decides retention.
        best_fn=None if best_metric is None else (lambda metrics: metrics[best_metric]),
        best_mode="min",
        enable_async_checkpointing=False,  # deterministic: files exist once save() returns
        create=not read_only,
        read_only=read_only,
    )
    # One item handled by StandardCheckpointHandler, so item_metadata() and a target-free restore
    # work on a fresh manager (a new process) too.
    return ocp.CheckpointManager(
        os.fspath(directory), options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: PyTree,
    metrics: dict[str, float] | None = None,
) -> bool:
    """Saves ``state`` at ``step`` (with ``metrics`` for best-checkpoint selection) and waits.

    Returns whether a checkpoint was written (orbax skips a step it already holds).
    """
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    saved = manager.save(int(step), args=ocp.args.StandardSave(state), metrics=metrics)
    manager.wait_until_finished()
    return saved


def abstract_state(state: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves (with sharding): the restore target for ``state``'s layout."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _key_name(entry) -> str:
    # Orbax stores dicts and namedtuples as dicts, tuples and lists as lists.
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _layout(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(e) for e in path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in leaves
    }


def _check_layout(directory, step: int, stored: PyTree, expected: PyTree, what: str):
    """Raises a ValueError listing the differences between the stored and the expected layout."""
    have, want = _layout(stored), _layout(expected)
    problems = [f"missing in checkpoint: {k}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected in checkpoint: {k}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"{k}: checkpoint has shape {have[k][0]} {have[k][1]}, expected {want[k][0]} {want[k][1]}"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(
            f"checkpoint {os.fspath(directory)} step {step} does not match the expected {what} "
            f"(a different model or optimizer configuration?):\n  {shown}"
        )


def _require_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    directory = os.fspath(manager.directory)
    steps = manager.all_steps() if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {directory}; have {sorted(steps)}"
        )
    return step


def restore(manager: ocp.CheckpointManager, abstract: PyTree, step: int | None = None) -> PyTree:
    """Restores ``step`` (default: the latest) into the structure, shapes and shardings of
    ``abstract`` (e.g. ``abstract_state(fresh_state)``), after checking that they match."""
    step = _require_step(manager, step)
    stored = manager.item_metadata(step).tree
    _check_layout(manager.directory, step, stored, abstract, "train state")
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(manager: ocp.CheckpointManager, abstract: PyTree) -> PyTree:
    """The latest checkpoint, restored into ``abstract``'s layout (see ``restore``)."""
    return restore(manager, abstract, None)


def restore_params(
    directory: str | os.PathLike, abstract_params: PyTree | None = None, step: int | None = None
) -> PyTree:
    """The ``params`` of a saved train state, for inference: the latest step unless ``step``.

    With ``abstract_params`` (e.g. ``jax.eval_shape`` of ``init_params``), the stored parameters are
    checked against it first and a mismatch raises a ValueError naming the directory.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = make_manager(directory, best_metric=None, read_only=True)
    try:
        step = _require_step(manager, step)
        stored = manager.item_metadata(step).tree
        if "params" not in stored:
            raise ValueError(f"checkpoint {directory} step {step} holds no 'params'")
        if abstract_params is not None:
            _check_layout(directory, step, stored["params"], abstract_params, "parameters")
        return manager.restore(step)["params"]
    finally:
        manager.close()


__all__ = [
    "abstract_state",
    "make_manager",
    "restore",
    "restore_latest",
    "restore_params",
    "save",
]
