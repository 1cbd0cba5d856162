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

Faults. Orbax writes a step into ``STEP.orbax-checkpoint-tmp`` and renames it to ``STEP`` once
complete, so a save killed midway leaves the previous steps intact and only a temporary directory,
which ``all_steps`` / ``restore_latest`` ignore and a writable manager deletes when it is created
(``cleanup_tmp_directories``). A step whose files are truncated, missing or corrupted raises a
``ValueError`` naming the directory and the step (and listing the other steps) instead of loading:
orbax itself raises on truncated or missing files, but overwritten bytes in an array's data load
silently as wrong numbers (measured with orbax-checkpoint 0.12.8), so ``save`` stores a SHA-256 of
every array in the step's metadata (``custom_metadata["jaxformer_checksums"]``, written before the
rename) and every restore checks the arrays it read against them. A step saved without checksums
(another tool, or its ``_CHECKPOINT_METADATA`` deleted) is refused unless ``verify=False``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxformer.typing import PyTree

CHECKSUMS = "jaxformer_checksums"  # the step's custom_metadata key holding checksums(state)


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
        # Deletes the STEP.orbax-checkpoint-tmp directories of saves that were killed midway.
        cleanup_tmp_directories=not read_only,
    )
    # One item handled by StandardCheckpointHandler, so item_metadata() and a target-free restore
    # work on a fresh manager (a new process) too.
    # orbax refuses a relative path (at the first save): resolve it against the working directory.
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=ocp.StandardCheckpointHandler()
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
    saved = manager.save(
        int(step),
        args=ocp.args.StandardSave(state),
        metrics=metrics,
        custom_metadata={CHECKSUMS: checksums(state)},
    )
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


def _path_name(path) -> str:
    return "/".join(_key_name(e) for e in path)


def checksums(tree: PyTree) -> dict[str, str]:
    """``{"params/...": SHA-256 of the array's bytes}`` for every leaf of ``tree`` (what ``save``
    stores and a restore checks)."""
    sums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        data = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        sums[_path_name(path)] = hashlib.sha256(data.tobytes()).hexdigest()
    return sums


def _layout(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


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


def _read(manager: ocp.CheckpointManager, step: int, what: str, read: Callable[[], Any]) -> Any:
    """``read()``, with any failure of orbax / tensorstore turned into a ValueError naming the step."""
    try:
        return read()
    except Exception as error:
        lines = str(error).strip().splitlines()
        detail = (lines[0] if lines else "").split(" See full TensorStore details")[0][:300]
        raise ValueError(
            f"checkpoint {os.fspath(manager.directory)} step {step}: cannot read its {what} "
            f"(truncated, missing or corrupted files?); steps in the directory: "
            f"{sorted(manager.all_steps())}. {type(error).__name__}: {detail}"
        ) from error


def _stored_layout(manager: ocp.CheckpointManager, step: int) -> PyTree:
    metadata = _read(manager, step, "metadata", lambda: manager.item_metadata(step))
    if metadata is None or getattr(metadata, "tree", None) is None:
        raise ValueError(
            f"checkpoint {os.fspath(manager.directory)} step {step} has no array metadata (its "
            f"default/_METADATA file is missing?); steps in the directory: "
            f"{sorted(manager.all_steps())}"
        )
    return metadata.tree


def _verify(manager: ocp.CheckpointManager, step: int, restored: PyTree, prefix: str = "") -> None:
    """Raises a ValueError unless every restored array has the checksum stored at save time."""
    directory = os.fspath(manager.directory)
    custom = _read(manager, step, "metadata", lambda: manager.metadata(step)).custom_metadata
    stored = (custom or {}).get(CHECKSUMS)
    if not isinstance(stored, dict):
        raise ValueError(
            f"checkpoint {directory} step {step} has no array checksums (its _CHECKPOINT_METADATA "
            f"is missing, or it was not saved by jaxformer.training.checkpoint.save), so its arrays cannot "
            f"be verified; pass verify=False to load it unverified"
        )
    got = checksums(restored)
    bad = [name for name in got if stored.get(prefix + name) != got[name]]
    if bad:
        shown = ", ".join(prefix + name for name in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"checkpoint {directory} step {step} is corrupted: {len(bad)} of {len(got)} arrays "
            f"differ from what was saved (SHA-256 mismatch): {shown}; steps in the directory: "
            f"{sorted(manager.all_steps())}"
        )


def restore(
    manager: ocp.CheckpointManager,
    abstract: PyTree,
    step: int | None = None,
    *,
    verify: bool = True,
) -> PyTree:
    """Restores ``step`` (default: the latest) into the structure, shapes and shardings of
    ``abstract`` (e.g. ``abstract_state(fresh_state)``), after checking that they match, and checks
    the arrays read against the checksums stored at save time (unless ``verify=False``)."""
    step = _require_step(manager, step)
    _check_layout(manager.directory, step, _stored_layout(manager, step), abstract, "train state")
    args = ocp.args.StandardRestore(abstract)
    restored = _read(manager, step, "arrays", lambda: manager.restore(step, args=args))
    if verify:
        _verify(manager, step, restored)
    return restored


def restore_latest(
    manager: ocp.CheckpointManager, abstract: PyTree, *, verify: bool = True
) -> PyTree:
    """The latest checkpoint, restored into ``abstract``'s layout (see ``restore``)."""
    return restore(manager, abstract, None, verify=verify)


def restore_params(
    directory: str | os.PathLike,
    abstract_params: PyTree | None = None,
    step: int | None = None,
    *,
    verify: bool = True,
) -> PyTree:
    """The ``params`` of a saved train state, for inference: the latest step unless ``step``.

    With ``abstract_params`` (e.g. ``jax.eval_shape`` of ``init_params``), the stored parameters are
    checked against it first and a mismatch raises a ValueError naming the directory. The parameters
    read are checked against the checksums stored at save time (unless ``verify=False``).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = make_manager(directory, best_metric=None, read_only=True)
    try:
        step = _require_step(manager, step)
        stored = _stored_layout(manager, step)
        if "params" not in stored:
            raise ValueError(f"checkpoint {directory} step {step} holds no 'params'")
        if abstract_params is not None:
            _check_layout(directory, step, stored["params"], abstract_params, "parameters")
        # Onto one local device, whatever mesh saved it: a target-free restore would ask for the
        # saving topology (orbax: "Topology mismatch") when the device count differs.
        one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), stored
        )
        args = ocp.args.StandardRestore(target)
        params = _read(manager, step, "arrays", lambda: manager.restore(step, args=args))["params"]
        if verify:
            _verify(manager, step, params, prefix="params/")
        return params
    finally:
        manager.close()


__all__ = [
    "abstract_state",
    "checksums",
    "make_manager",
    "restore",
    "restore_latest",
    "restore_params",
    "save",
]
