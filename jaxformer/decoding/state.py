"""The search-state protocol: how a step function's state follows the beams.

The search holds the step function's state for ``R = B*W`` rows laid out as OpenNMT-tf's
``tile_batch`` lays them out (``[b0w0, b0w1, ..., b1w0, ...]``). It asks the state two things:

- ``tile_batch(state, W)``: before the first step, W copies of every batch entry;
- ``reorder(state, indices)``: after each beam-search step, row r continues row ``indices[r]``'s
  hypothesis (``indices`` stay within each batch entry).

A pytree node that implements ``BeamState`` (``tile_beams`` / ``reorder_beams``) answers for itself:
that is how a cache keeps its own layout (``jaxformer.models.cache.BeamKVCache`` reorders an origin
table instead of copying its keys and values). Every other leaf is an array whose leading axis is the
batch (repeated and gathered along axis 0), or a scalar, which has no batch axis and is left as it is
(a step counter, a temperature). Whatever must not follow the beams at all (the encoder memory, per
entry) is not part of the state: the search passes it to each step beside the state
(``dynamic_decode(..., shared=...)``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxformer.typing import Array, Int, PyTree


@runtime_checkable
class BeamState(Protocol):
    """A state node that knows how to follow the beams (its leaves may have any layout)."""

    def tile_beams(self, width: int) -> BeamState: ...

    def reorder_beams(self, indices: Int[Array, " R"]) -> BeamState: ...


def _is_node(x) -> bool:
    return isinstance(x, BeamState)


def _path(path) -> str:
    return jax.tree_util.keystr(path) or "the state"


def check_batch_axis(state: PyTree, batch: int) -> None:
    """Every leaf that is not a scalar nor inside a ``BeamState`` must have ``batch`` rows first."""

    leaves, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_node)
    for path, x in leaves:
        if _is_node(x) or jnp.ndim(x) == 0:
            continue
        if jnp.shape(x)[0] != batch:
            raise ValueError(
                f"initial_state{_path(path)}: every non-scalar leaf needs the batch axis first "
                f"({batch} rows, one per start id), got shape {tuple(jnp.shape(x))}"
            )


def tile_batch(state: PyTree, width: int) -> PyTree:
    """W copies of every batch entry along axis 0: ``[b0, b0, b1, b1, ...]`` for ``width=2``."""
    if width == 1:
        return state

    def one(x):
        if _is_node(x):
            return x.tile_beams(width)
        return x if jnp.ndim(x) == 0 else jnp.repeat(x, width, axis=0)

    return jax.tree.map(one, state, is_leaf=_is_node)


def reorder(state: PyTree, indices: Int[Array, " R"]) -> PyTree:
    """Row r of the result continues row ``indices[r]`` of ``state`` (the beam-search reorder)."""

    def one(x):
        if _is_node(x):
            return x.reorder_beams(indices)
        return x if jnp.ndim(x) == 0 else jnp.take(x, indices, axis=0)

    return jax.tree.map(one, state, is_leaf=_is_node)
