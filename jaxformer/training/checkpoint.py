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
silently as wrong numbers (measured with orbax-checkpoint 0.12.8), so ``save`` stores a checksum of
every array in the step's metadata (``custom_metadata["jaxformer_checksums_v2"]``, written before the
rename) and every restore checks the arrays it read against them. A step saved without checksums
(another tool, or its ``_CHECKPOINT_METADATA`` deleted) is refused unless ``verify=False``.

Several processes (``jaxformer.training.sharding.initialize_distributed``). Every process calls
``save`` / ``restore`` with the same arguments; orbax writes each array's shards from the processes that
hold them (``default/ocdbt.process_N``) and process 0 writes the metadata, so no array is gathered
onto one host. The checksum is built for that: an array's checksum is a sum over its elements,
modulo 2**64, of a 64-bit mix (splitmix64) of the element's bits and of its position in the whole
array. A sum splits over any sharding: each process adds up the shards it holds (one copy of each: ``replica_id == 0``), the processes exchange these partial sums (a few
bytes per array, ``multihost_utils.process_allgather``) and add them. So the same checksum comes out
whatever the mesh or the number of processes that saved or restores the step: a checkpoint saved on
N processes restores, verified, on one (``restore`` into a one-process ``abstract``, or
``restore_params``), and the other way round. It detects accidental damage (the mix is a bijection, so
one changed element always changes the sum; several cancel out with a chance of about 2**-64); it is
not a cryptographic hash. (orbax-checkpoint 0.12.8
has no checksum of its own.)

Checkpoints written before these checksums hold a SHA-256 of every whole array
(``custom_metadata["jaxformer_checksums"]``): they still restore, verified against those (an array
that spans processes is then gathered to compute its SHA-256; restore such steps on one process).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxformer.typing import PyTree

# The step's custom_metadata key holding {"algorithm": CHECKSUM_ALGORITHM, "arrays": checksums(state)}.
CHECKSUMS = "jaxformer_checksums_v2"
CHECKSUM_ALGORITHM = "splitmix64-position-sum-64"
# Before: {"params/...": SHA-256 of the whole array} (sha256_checksums), still verified on restore.
LEGACY_CHECKSUMS = "jaxformer_checksums"


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

    Returns whether a checkpoint was written (orbax skips a step it already holds). With several
    processes, every process calls it with the same ``step`` and its part of the same global ``state``.
    """
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    saved = manager.save(
        int(step),
        args=ocp.args.StandardSave(state),
        metrics=metrics,
        custom_metadata={CHECKSUMS: {"algorithm": CHECKSUM_ALGORITHM, "arrays": checksums(state)}},
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


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SEED = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 1 << 20  # elements mixed at a time (bounds the uint64 temporaries)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (a bijection; numpy's uint64 arithmetic wraps)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _positions(shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Row-major positions in an array of ``shape`` of the elements of the block ``index`` (slices)."""
    flat = np.zeros((), np.uint64)
    for size, part in zip(shape, index, strict=True):
        start, stop, stride = part.indices(size)
        flat = flat[..., None] * np.uint64(size) + np.arange(start, stop, stride, dtype=np.uint64)
    return flat.reshape(-1)


def _block_sum(shape: tuple[int, ...], index: tuple, block: np.ndarray) -> np.uint64:
    """The sum (mod 2**64) over the elements of ``block``, which sits at ``index`` in ``shape``."""
    block = np.asarray(block)
    if block.dtype.itemsize > 8:
        raise ValueError(
            f"checksums: no checksum for {block.dtype} arrays (over 8 bytes per element)"
        )
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if block.ndim == 0:
        parts = [(index, block.reshape(1))]
    else:  # chunks along the first axis, about _CHUNK elements each
        start, _, stride = index[0].indices(shape[0])
        rows = max(1, _CHUNK // max(1, block[0].size))
        parts = [
            ((slice(start + r * stride, start + min(r + rows, len(block)) * stride, stride),
              *index[1:]), block[r : r + rows])
            for r in range(0, len(block), rows)
        ]  # fmt: skip
    total = np.uint64(0)
    for where, part in parts:
        bits = np.ascontiguousarray(part).reshape(-1).view(f"u{block.dtype.itemsize}")
        mixed = _mix(bits.astype(np.uint64) ^ _mix(_positions(shape, where) ^ _SEED))
        total = np.add(total, np.sum(mixed, dtype=np.uint64), dtype=np.uint64)
    return total


def _leaves(tree: PyTree) -> list[tuple[str, Any]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append((_path_name(path), leaf))
    return out


def checksums(tree: PyTree) -> dict[str, str]:
    """``{"params/...": 16 hex digits}`` for every leaf of ``tree`` (what ``save`` stores and a
    restore checks): the position-keyed sum of the module docstring, independent of the sharding.

    Arrays that span processes are never gathered: each process sums the shards it holds and the
    partial sums are exchanged, so with several processes every process must call it (collectively).
    """
    leaves = _leaves(tree)
    sums = [0] * len(leaves)  # Python ints, kept modulo 2**64
    spanning = []  # rows of arrays that span processes: their partial sums are added over processes
    for row, (_, leaf) in enumerate(leaves):
        if isinstance(leaf, jax.Array):
            if not leaf.is_fully_addressable:
                spanning.append(row)
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:  # one copy of every block, over all processes
                    block = _block_sum(leaf.shape, shard.index, np.asarray(shard.data))
                    sums[row] = (sums[row] + int(block)) % 2**64
        else:
            leaf = np.asarray(leaf)
            sums[row] = int(_block_sum(leaf.shape, (), leaf))
    if spanning and jax.process_count() > 1:
        mine = np.array([sums[row] for row in spanning], np.uint64).view(np.uint8)  # [rows * 8]
        every = np.ascontiguousarray(multihost_utils.process_allgather(mine))  # [P, rows * 8]
        for row, parts in zip(spanning, every.view(np.uint64).T.tolist(), strict=True):
            sums[row] = sum(parts) % 2**64
    return {name: f"{sums[row]:016x}" for row, (name, _) in enumerate(leaves)}


def sha256_checksums(tree: PyTree) -> dict[str, str]:
    """``{"params/...": SHA-256 of the whole array's bytes}``: the checksums of checkpoints saved by
    earlier versions (``LEGACY_CHECKSUMS``). An array spanning processes is gathered first."""
    sums = {}
    for name, leaf in _leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        data = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        sums[name] = hashlib.sha256(data.tobytes()).hexdigest()
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
    custom = _read(manager, step, "metadata", lambda: manager.metadata(step)).custom_metadata or {}
    current, legacy = custom.get(CHECKSUMS), custom.get(LEGACY_CHECKSUMS)
    if isinstance(current, dict) and isinstance(current.get("arrays"), dict):
        if current.get("algorithm") != CHECKSUM_ALGORITHM:
            raise ValueError(
                f"checkpoint {directory} step {step} has checksums of another kind "
                f"({current.get('algorithm')!r}, this version computes {CHECKSUM_ALGORITHM!r}); "
                f"pass verify=False to load it unverified"
            )
        stored, got, kind = current["arrays"], checksums(restored), "checksum"
    elif isinstance(legacy, dict):  # saved by an earlier version: whole-array SHA-256
        stored, got, kind = legacy, sha256_checksums(restored), "SHA-256"
    else:
        raise ValueError(
            f"checkpoint {directory} step {step} has no array checksums (its _CHECKPOINT_METADATA "
            f"is missing, or it was not saved by jaxformer.training.checkpoint.save), so its arrays cannot "
            f"be verified; pass verify=False to load it unverified"
        )
    bad = [name for name in got if stored.get(prefix + name) != got[name]]
    if bad:
        shown = ", ".join(prefix + name for name in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"checkpoint {directory} step {step} is corrupted: {len(bad)} of {len(got)} arrays "
            f"differ from what was saved ({kind} mismatch): {shown}; steps in the directory: "
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
    "sha256_checksums",
]
