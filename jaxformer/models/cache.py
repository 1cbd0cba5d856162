"""The KV cache: an explicit pytree that a decode step takes and returns.

Every leaf has the batch (or search row) axis first, so a search can tile it to ``B*W`` rows and reorder
it with one gather per leaf. Self-attention keys and values are preallocated to the maximum length and
written one slot per step; cross-attention keys and values are computed once from the encoder memory.

Beam search without copying the cache. A beam reorder would gather every preallocated slot of every
layer (``2 * L * R * S * N * H`` numbers, about 100 MB a step for ``base`` at batch 16, beam 4), though
only the newest slot of each row was written. A ``KVCache(indirect=True)`` (the Transformer and LM
decoders make theirs so) is tiled with an ``origin [R, S]`` table instead: ``origin[r, t]`` is the beam,
within row r's batch entry, whose slot t holds position t of row r's hypothesis. A reorder gathers only
that table; a step writes its keys/values into its own row and ``origin[r, step] = own beam``; the
attention reads slot t of beam ``origin[r, t]`` (``attention.py``). Slot t of a row is written once, at
step t, so whatever an ``origin`` points to stays valid. FasterTransformer calls this table the cache
indirection. A tiled indirect cache keeps its keys and values as ``[B, N, W, S, H]`` (the W beams of
an entry inside each head), so that the attention of a query against all the slots of its entry's
beams is one batched matrix product over (B, N) with nothing copied; ``rows()`` gives the ``[R, N, S,
H]`` view.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxformer.typing import Array, Float, Int, PyTree


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer."""

    # Annotated as Any: pytree leaves are not always arrays (eval_shape, vmap, None placeholders).
    k: Any  # float[B, N, S, H]: heads-major (see attention.py); [B, N, W, S, H] tiled with origin
    v: Any  # float[B, N, S, H] or [B, N, W, S, H]
    origin: Any = None  # int32[R, S] beam whose slot t holds this row's position t; None: its own
    indirect: bool = struct.field(pytree_node=False, default=False)  # tile with `origin`
    width: int = struct.field(pytree_node=False, default=1)  # beams per batch entry (with `origin`)

    @classmethod
    def zeros(
        cls, batch: int, length: int, num_heads: int, head_dim: int, dtype, indirect: bool = False
    ) -> KVCache:
        shape = (batch, num_heads, length, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), indirect=indirect)

    @classmethod
    def of(cls, k: Float[Array, "B S N H"], v: Float[Array, "B S N H"]) -> KVCache:
        """A cache holding keys and values given in the projections' ``[B, S, N, H]`` layout."""
        return cls(k=jnp.swapaxes(k, 1, 2), v=jnp.swapaxes(v, 1, 2))

    @property
    def length(self) -> int:
        return self.k.shape[-2]

    def rows(self) -> tuple[Array, Array]:
        """Keys and values ``[R, N, S, H]``, one row per search row (slots as written, not via origin)."""
        if self.k.ndim == 4:
            return self.k, self.v
        per_row = lambda x: jnp.swapaxes(x, 1, 2).reshape(-1, x.shape[1], *x.shape[3:])
        return per_row(self.k), per_row(self.v)

    def write(self, k, v, start) -> KVCache:
        """Keys/values ``[R, T, N, H]`` into slots ``start .. start+T-1`` of each row's own cache."""
        update = lambda cache, new, axis: jax.lax.dynamic_update_slice_in_dim(
            cache, new.astype(cache.dtype), start, axis
        )
        if self.k.ndim == 4:
            heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [R, T, N, H] --> [R, N, T, H]
            return self.replace(
                k=update(self.k, heads_major(k), 2), v=update(self.v, heads_major(v), 2)
            )
        rows, length = k.shape[:2]
        batch = rows // self.width
        beams_in_heads = lambda x: x.reshape(batch, self.width, *x.shape[1:]).transpose(
            0, 3, 1, 2, 4
        )  # [R, T, N, H] --> [B, N, W, T, H]
        own = jnp.arange(rows, dtype=jnp.int32) % self.width  # [R]: these slots now hold own beam
        origin = update(self.origin, jnp.broadcast_to(own[:, None], (rows, length)), 1)  # [R, S]
        return self.replace(
            k=update(self.k, beams_in_heads(k), 3),
            v=update(self.v, beams_in_heads(v), 3),
            origin=origin,
        )


def _indirect(x) -> bool:
    return isinstance(x, KVCache) and x.indirect


@struct.dataclass
class DecoderCache:
    """The whole decoder's state between steps.

    ``self_attention``: one preallocated ``KVCache`` per decoder layer (slot j holds position j).
    ``memory``: one ``KVCache`` of cross-attention keys/values per layer, computed once at init (empty
    tuple for a decoder-only LM). ``memory_mask``: ``[B, S]`` real source positions, or None.
    """

    self_attention: tuple[KVCache, ...]
    memory: tuple[KVCache, ...] = ()
    memory_mask: Any = None  # bool[B, S] or None

    @property
    def max_length(self) -> int:
        return self.self_attention[0].length


def reorder(state: PyTree, indices: Int[Array, " R"]) -> PyTree:
    """Gather rows ``indices`` of every leaf (the beam-search reorder).

    An indirect ``KVCache`` gathers its ``origin`` table only (``indices`` stay within each batch
    entry, so the beams it names stay valid).
    """
    gather = lambda x: jnp.take(x, indices, axis=0)

    def one(x):
        if _indirect(x) and x.origin is not None:
            return x.replace(origin=gather(x.origin))  # [R, S]
        return jax.tree.map(gather, x)

    return jax.tree.map(one, state, is_leaf=_indirect)


def tile_batch(state: PyTree, multiplier: int) -> PyTree:
    """Repeat each batch entry ``multiplier`` times along axis 0: ``[b0, b0, b1, b1, ...]``.

    An indirect ``KVCache`` also gets its ``origin`` table: every slot of row r is its own (r % W).
    """
    if multiplier == 1:
        return state
    repeat = lambda x: jnp.repeat(x, multiplier, axis=0)

    def one(x):
        if not _indirect(x):
            return jax.tree.map(repeat, x)
        if x.origin is not None:
            raise ValueError("this KVCache is tiled already (it has an origin table)")
        rows, length = x.k.shape[0] * multiplier, x.length
        own = jnp.arange(rows, dtype=jnp.int32) % multiplier  # [R]
        origin = jnp.broadcast_to(own[:, None], (rows, length))  # [R, S]
        beams = lambda a: jnp.repeat(a[:, :, None], multiplier, axis=2)  # --> [B, N, W, S, H]
        return x.replace(k=beams(x.k), v=beams(x.v), origin=origin, width=multiplier)

    return jax.tree.map(one, state, is_leaf=_indirect)
