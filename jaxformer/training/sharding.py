"""Data and tensor parallelism with ``jax.sharding``: a mesh, partition rules, sharded training and decoding.

    mesh = make_mesh(data=4, model=2)                 # 8 devices: batch split 4 ways, heads / F 2 ways
    state = shard_params(create_train_state(model, key, config), mesh)  # params and Adam moments
    train_step = make_sharded_train_step(model, config, mesh, state)
    state, metrics = train_step(state, shard_batch(batch, mesh))
    result = generate(model, shard_params(params, mesh), shard_batch(src_ids, mesh), ...)

Nothing here is a collective written by hand: arrays are placed with ``NamedSharding`` and ``jax.jit``
(with ``in_shardings`` / ``out_shardings`` for training, by propagation from the arguments for
``generate``) lets XLA insert the all-reduces. The model modules are unchanged; their parameters are
mapped to mesh axes in two steps, as flax's logical partitioning does:

1. ``PARAM_RULES``: a parameter path (``decoder/layer_0/self_attention/qkv/kernel``) to one logical axis
   name per dimension (``("embed", None, "heads", "head_dim")``). The first rule whose pattern is found
   in the path wins (and must name as many axes as the leaf has dimensions, else ``ValueError``); a
   leaf no rule matches (counters, keys, other modules' weights) is replicated. The Hourglass LM's
   attention and feed-forward layers carry the same names and get the same layout.
2. ``LOGICAL_AXIS_RULES``: a logical axis to a mesh axis. ``heads`` and ``mlp`` go to ``"model"``
   (Megatron-style: column-parallel QKV / inner, row-parallel out / outer), ``batch`` to ``"data"``;
   every other axis (``embed``, ``vocab``, ``head_dim``) is replicated.

Any pytree whose leaves sit under the parameter names gets the same rules: the parameters, the Adam
moments (``mu`` / ``nu`` mirror the parameter tree) and a whole ``TrainState``.

A dimension that the mesh axis does not divide (4 heads on ``model=8``) is replicated instead of
sharded, silently, unless ``strict=True``, which raises a ``ValueError`` naming the parameter.
With grouped-query attention (``TransformerConfig.num_kv_heads`` K < N) the ``kv [D, 2, K, H]``
projection is split over its K heads like ``query [D, N, H]`` over its N: when the model axis
divides N but not K (multi-query attention, K = 1, on ``model=2``), ``kv`` is replicated and the
computation stays correct (XLA moves what each device needs), or ``strict=True`` refuses it.

Several processes (hosts, or processes on one machine): call ``initialize_distributed()`` first in
every process, then build the mesh over all devices (``jax.devices()`` lists every process's devices,
process by process, so ``make_mesh(data, model)`` with ``model`` at most a process's device count
keeps the model axis inside each process and spans the processes with ``"data"``), and give
``shard_batch`` each process's own rows (process ``i`` of ``P``: rows ``i * B / P`` to
``(i + 1) * B / P`` of the global batch ``B``). Collectives across processes go over the network; on
CPU JAX uses gloo (``jax_cpu_collectives_implementation``, its default). Every process runs the same
program: the same jitted steps, and ``jaxformer.training.checkpoint.save`` / ``restore`` with the
same arguments (each process writes and reads the shards it holds). Results that span processes come
back to a host with ``jax.experimental.multihost_utils.process_allgather(x, tiled=True)``.
``tests/training/test_two_processes.py`` runs two processes of two CPU devices each on one machine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxformer.training.step import TrainConfig, make_train_step
from jaxformer.typing import PyTree

MESH_AXES = ("data", "model")

# Parameter path (regular expression searched in "a/b/c") -> one logical axis per dimension.
# Shapes: fused self-attention qkv [D, 3, N, H], cross-attention kv [D, 2, N, H], query [D, N, H],
# out [N, H, D], feed-forward inner [D, F] and outer [F, D], embeddings [V, D], output [D, V]; with
# grouped-query attention, self-attention's query [D, N, H] and kv [D, 2, K, H] (K key/value heads).
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)qkv/kernel$", ("embed", None, "heads", "head_dim")),
    (r"(^|/)qkv/bias$", (None, "heads", "head_dim")),
    (r"(^|/)kv/kernel$", ("embed", None, "heads", "head_dim")),
    (r"(^|/)kv/bias$", (None, "heads", "head_dim")),
    (r"(^|/)query/kernel$", ("embed", "heads", "head_dim")),
    (r"(^|/)query/bias$", ("heads", "head_dim")),
    (r"(^|/)out/kernel$", ("heads", "head_dim", "embed")),
    (r"(^|/)out/bias$", ("embed",)),
    (r"(^|/)relative_(keys|values)$", ("relative", "head_dim")),
    (r"(^|/)ffn/inner/kernel$", ("embed", "mlp")),
    (r"(^|/)ffn/inner/bias$", ("mlp",)),
    (r"(^|/)ffn/outer/kernel$", ("mlp", "embed")),
    (r"(^|/)ffn/outer/bias$", ("embed",)),
    (r"(^|/)embedding$", ("vocab", "embed")),
    (r"(^|/)output/kernel$", ("embed", "vocab")),
    (r"(^|/)output/bias$", ("vocab",)),
    (r"(^|/)\w*norm\w*/(scale|bias)$", ("embed",)),
)

# Logical axis -> mesh axis (None: replicated). Axes not listed are replicated too.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("vocab", None),
    ("head_dim", None),
    ("relative", None),
)


def make_mesh(data: int, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "model")`` mesh of ``data * model`` devices (``jax.devices()`` by default).

    ``data=-1`` takes every device the model axis leaves. ``data * model`` must divide the number of
    devices; a smaller mesh uses the first ``data * model`` of them (``make_mesh(1)``: one device).
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if isinstance(model, bool) or not isinstance(model, int) or model < 1:
        raise ValueError(f"make_mesh: model must be an int >= 1, got {model!r}")
    if isinstance(data, bool) or not isinstance(data, int) or (data < 1 and data != -1):
        raise ValueError(f"make_mesh: data must be an int >= 1 or -1 (all devices), got {data!r}")
    if data == -1:
        if count % model:
            raise ValueError(f"make_mesh: model={model} must divide the {count} devices")
        data = count // model
    if count % (data * model):
        raise ValueError(
            f"make_mesh: data * model = {data} * {model} = {data * model} must divide the number "
            f"of devices ({count}); allowed products: "
            f"{[d for d in range(1, count + 1) if count % d == 0]}"
        )
    axis_types = (AxisType.Auto,) * len(MESH_AXES)  # sharding by propagation, not in the types
    return jax.make_mesh(
        (data, model), MESH_AXES, axis_types=axis_types, devices=devices[: data * model]
    )


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
    """The logical axes of the parameter at ``path`` ("a/b/kernel"), or None if no rule matches."""
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(
                    f"parameter {path!r} has {ndim} dimension(s) but the rule {pattern!r} names "
                    f"{len(axes)}: {axes}"
                )
            return axes
    return None


def _leaf_path(key_path) -> str:
    """The dict keys along a pytree path: ``opt_state[0].mu['decoder']['out']`` -> ``decoder/out``."""
    return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def partition_spec(
    path: str,
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    *,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
    strict: bool = False,
) -> PartitionSpec:
    """The ``PartitionSpec`` of one leaf (see the module docstring for fallbacks)."""
    axes = logical_axes(path, len(shape)) if path else None
    if axes is None:
        return PartitionSpec()
    to_mesh = dict(rules)
    spec, used = [], set()
    for logical, size in zip(axes, shape, strict=True):
        mesh_axis = to_mesh.get(logical) if logical is not None else None
        if mesh_axis is not None and mesh_axis not in mesh.shape:
            raise ValueError(
                f"rules map {logical!r} to mesh axis {mesh_axis!r}, which the mesh lacks "
                f"(mesh axes: {tuple(mesh.shape)})"
            )
        if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1:
            spec.append(None)
            continue
        if size % mesh.shape[mesh_axis]:
            if strict:
                raise ValueError(
                    f"parameter {path!r} of shape {tuple(shape)}: its {logical!r} dimension "
                    f"({size}) is not divisible by mesh axis {mesh_axis!r} "
                    f"(size {mesh.shape[mesh_axis]}); use strict=False to replicate it"
                )
            spec.append(None)
            continue
        spec.append(mesh_axis)
        used.add(mesh_axis)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_specs(
    tree: PyTree,
    mesh: Mesh | AbstractMesh,
    *,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
    strict: bool = False,
) -> PyTree:
    """A ``PartitionSpec`` per leaf of ``tree`` (params, optimizer state or a ``TrainState``).

    Leaves are matched on the dict keys of their path, so Adam's ``mu`` / ``nu`` get their parameter's
    spec; scalars and leaves no rule matches are replicated (``PartitionSpec()``). A dimension the
    mesh axis does not divide is replicated, or with ``strict=True`` raises a ``ValueError``.
    ``mesh`` may be an ``AbstractMesh`` (no devices needed: plan a layout before you have them).
    """
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: partition_spec(_leaf_path(kp), np.shape(x), mesh, rules=rules, strict=strict),
        tree,
    )


def param_shardings(
    tree: PyTree,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
    strict: bool = False,
) -> PyTree:
    """``param_specs`` as ``NamedSharding`` on ``mesh``: ``in_shardings`` / ``device_put`` ready."""
    specs = param_specs(tree, mesh, rules=rules, strict=strict)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_params(
    tree: PyTree,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
    strict: bool = False,
) -> PyTree:
    """``tree`` (params, optimizer state or a ``TrainState``) placed on ``mesh`` by the rules."""
    return jax.device_put(tree, param_shardings(tree, mesh, rules=rules, strict=strict))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis) split over ``"data"``, every other axis replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Every array of ``batch`` (an array or a dict of them) split by rows over ``"data"``.

    Single process: ``batch`` is the global batch. Multi-host: each process passes its own rows and
    the global batch is their concatenation in process order (``make_array_from_process_local_data``).
    The global number of rows must be a multiple of the data axis size.
    """
    sharding = batch_sharding(mesh)
    data = mesh.shape["data"]

    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim < 1:
            raise ValueError(f"shard_batch: every array needs a batch axis, got shape {x.shape}")
        rows = x.shape[0] * jax.process_count()
        if rows % data:
            raise ValueError(
                f"shard_batch: the batch has {rows} rows, not a multiple of the mesh's data axis "
                f"({data}); pad the batch or choose data dividing {rows}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(place, batch)


def make_sharded_train_step(model, config: TrainConfig, mesh: Mesh, state: PyTree):
    """``jaxformer.training.step.make_train_step`` jit-compiled with the state and the batch sharded.

    ``state`` (a ``TrainState``, sharded or not: only its structure and shapes are read) gives the
    shardings: parameters and Adam moments by ``param_shardings``, scalars replicated; the state comes
    out with the shardings it went in with and is donated. Batches are split by rows over ``"data"``
    (pass ``shard_batch(batch, mesh)`` or host arrays); metrics come back replicated. The maths is the
    single-device step's: XLA adds the all-reduces of the gradients and of the split contractions.
    """
    state_shardings = param_shardings(state, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        make_train_step(model, config),
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[int, int]:
    """Joins a multi-host run (``jax.distributed.initialize``); returns ``(process_id, process_count)``.

    Call it once per process, before any other JAX call. Arguments left None are read from
    ``JAX_COORDINATOR_ADDRESS`` (``host:port`` where process 0 serves the coordinator; every process
    gives the same), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (0 to ``num_processes - 1``, one
    per process); those still missing are detected by JAX on Cloud TPU, SLURM and Open MPI. Each
    process brings its local devices (on CPU, ``JAX_NUM_CPU_DEVICES=n`` simulates n of them).
    One process (``num_processes == 1``) initialises nothing. Afterwards ``jax.devices()`` lists every
    host's devices, so ``make_mesh`` spans them; each process feeds its own rows to ``shard_batch``,
    and ``jax.experimental.multihost_utils.process_allgather`` brings sharded results back to a host.
    """
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes (JAX_NUM_PROCESSES) must be >= 1, got {num_processes}")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id (JAX_PROCESS_ID) must be in [0, {num_processes}), got {process_id}"
        )
    if num_processes == 1:
        return 0, 1
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return jax.process_index(), jax.process_count()


__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "PARAM_RULES",
    "batch_sharding",
    "initialize_distributed",
    "logical_axes",
    "make_mesh",
    "make_sharded_train_step",
    "param_shardings",
    "param_specs",
    "partition_spec",
    "shard_batch",
    "shard_params",
]
