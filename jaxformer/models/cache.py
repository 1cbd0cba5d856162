"""KV caches: explicit pytrees that a decode step takes and returns, and how they follow beams.

Every per-row leaf has the batch (or search-row) axis first. Self-attention keys and values are
preallocated to the maximum length and written one slot per step (slot j holds position j of the row);
the encoder's keys and values (``Memory``) are computed once per source and never follow the beams.

Heads: a cache holds the K key/value heads of its layer (``TransformerConfig.num_kv_heads``; K = N
without grouped-query attention), so its memory is proportional to K: ``2 * B * K * S * H`` numbers
per layer. The N query heads read them in groups (``dot_product.py``); nothing is repeated to N heads.
With rotary positions the keys are stored rotated (as transformers does), so a slot is never rotated
again.

Sliding window (``TransformerConfig.sliding_window``): ``attend(..., window=W)`` masks the slots
older than W positions. The cache stays preallocated to the full length (no ring buffer) and a step
still reads every slot: the window changes the result, not the memory or the work.

The search asks a state for two things (the protocol of ``jaxformer.decoding.state``):
``tile_beams(width)`` (W copies of every batch entry) and ``reorder_beams(indices)`` (row r takes row
``indices[r]``'s hypothesis). A ``KVCache`` answers by copying rows, unless it was made with
``indirect=True`` (the decoders' self-attention caches are): then tiling gives a ``BeamKVCache``.

Beam search without copying the cache. A reorder that gathers rows moves every preallocated slot of
every layer (``2 * L * R * S * N * H`` numbers, about 100 MB a step for ``base`` at batch 16, beam 4),
though only the newest slot of each row was written. A ``BeamKVCache`` keeps an ``origin [R, S]`` table
instead: ``origin[r, t]`` is the beam, within row r's batch entry, whose slot t holds position t of row
r's hypothesis. A reorder gathers only that table; a step writes its keys/values into its own row and
sets ``origin[r, step]`` to its own beam; the attention reads slot t of beam ``origin[r, t]``. Slot t of
a row is written once, at step t, so whatever an ``origin`` entry points to stays valid.
FasterTransformer calls this table the cache indirection. The keys and values are ``[B, K, W, S, H]``
(the W beams of an entry inside each head) so that a query's attention to all the slots of its entry's
beams is one batched matrix product over (B, K), nothing copied; ``rows()`` gives the ``[R, K, S, H]``
view.

Positions. ``write`` and ``attend`` take the slot as a scalar (every row at the same position: a plain
``dynamic_update_slice``) or as ``int32[R]`` (each row at its own position, e.g. ragged prompts: one
scatter of a slot per row). ``read(slots)`` gathers chosen slots of each row (through the origin table
once tiled): the Hourglass LM reads its earlier inputs back that way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxformer.models.dot_product import attend_heads_major, attend_step, attend_through_origin
from jaxformer.models.masks import window_slots
from jaxformer.typing import Array, Float, Int


def _update(cache, new, start, axis):
    return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), start, axis)


def _one_slot(name: str, new) -> None:
    if new.shape[1] != 1:
        raise ValueError(f"{name}: per-row positions write one token per row, got {new.shape[1]}")


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer, ``[B, K, S, H]`` (heads-major: see ``attention.py``)."""

    # Annotated as Any: pytree leaves are not always arrays (eval_shape, vmap, None placeholders).
    k: Any  # float[B, K, S, H]
    v: Any  # float[B, K, S, H]
    indirect: bool = struct.field(pytree_node=False, default=False)  # tile to a BeamKVCache

    @classmethod
    def zeros(
        cls, batch: int, length: int, num_heads: int, head_dim: int, dtype, indirect: bool = False
    ) -> KVCache:
        """``num_heads``: the key/value heads K."""
        shape = (batch, num_heads, length, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), indirect=indirect)

    @classmethod
    def of(cls, k: Float[Array, "B S K H"], v: Float[Array, "B S K H"]) -> KVCache:
        """A cache holding keys and values given in the projections' ``[B, S, K, H]`` layout."""
        return cls(k=jnp.swapaxes(k, 1, 2), v=jnp.swapaxes(v, 1, 2))

    @property
    def length(self) -> int:
        return self.k.shape[-2]

    def rows(self) -> tuple[Array, Array]:
        """Keys and values ``[R, K, S, H]``, one row per search row."""
        return self.k, self.v

    def write(self, k: Float[Array, "R T K H"], v: Float[Array, "R T K H"], start) -> KVCache:
        """Keys/values into slots ``start .. start+T-1`` of each row (``start``: scalar or ``[R]``)."""
        if jnp.ndim(start) == 0:
            heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [R, T, K, H] --> [R, K, T, H]
            return self.replace(
                k=_update(self.k, heads_major(k), start, 2),
                v=_update(self.v, heads_major(v), start, 2),
            )
        _one_slot("KVCache.write", k)
        rows = jnp.arange(k.shape[0])
        put = lambda cache, new: cache.at[rows, :, start].set(new[:, 0].astype(cache.dtype))
        return self.replace(k=put(self.k, k), v=put(self.v, v))  # [R, K, S, H], slot start[r]

    def read(self, slots: Int[Array, "R M"]) -> tuple[Array, Array]:
        """Keys and values ``[R, M, K, H]``: row r's slots ``slots[r]`` (each in ``[0, S)``)."""
        rows = jnp.arange(slots.shape[0])[:, None]  # [R, 1]
        return self.k[rows, :, slots], self.v[rows, :, slots]

    def attend(
        self,
        q: Float[Array, "R 1 N H"],
        last,
        relative=(None, None),
        bias=None,
        new=None,
        window: int | None = None,
    ):
        """One query per row against slots ``0 .. last`` (``last``: scalar or ``[R]``).

        ``relative``: Shaw tables ``[1 or R, S, H]`` for keys and values, or ``(None, None)``;
        ``bias``: an additive per-head score bias ``[1 or R, N, 1, S]`` (T5), or None.
        ``new``: ``(k, v)`` ``[R, 1, K, H]``, the row's own key and value as slot ``last``, which
        the caller writes *after* this read: ``write(k, v, last).attend(q, last)`` without the
        write (the decoders' step; ``dot_product.attend_step`` says why the order matters).
        ``window``: only slots ``j > last - window`` too (a sliding window), or None.
        """
        slots = jnp.arange(self.length)
        mask = window_slots(last, self.length, window)[:, None, None, :]  # [1 or R, 1, 1, S]
        if jnp.ndim(last) == 0:
            at = (slots == last)[None]  # [1, S]
            rel_k, rel_v = relative  # [1, S, H]: the same query position for every row
        else:
            at = slots[None, :] == last[:, None]  # [R, S]
            rel_k, rel_v = (None if t is None else t[:, None] for t in relative)  # [R, 1, S, H]
        if new is not None:
            return attend_step(q, self.k, self.v, *new, at, mask, rel_k, rel_v, bias)
        out, _ = attend_heads_major(q, self.k, self.v, mask, rel_k, rel_v, bias=bias)
        return out

    # The search-state protocol (``jaxformer.decoding.state``).
    def tile_beams(self, width: int) -> KVCache | BeamKVCache:
        if not self.indirect:
            return jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), self)
        return BeamKVCache.tile(self.k, self.v, width)

    def reorder_beams(self, indices: Int[Array, " R"]) -> KVCache:
        return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), self)


@struct.dataclass
class BeamKVCache:
    """A self-attention cache tiled for beam search, read through an ``origin [R, S]`` table."""

    k: Any  # float[B, K, W, S, H]
    v: Any  # float[B, K, W, S, H]
    origin: Any  # int32[R, S]: the beam whose slot t holds this row's position t
    width: int = struct.field(pytree_node=False, default=1)  # W: beams per batch entry

    @classmethod
    def tile(cls, k: Float[Array, "B K S H"], v: Float[Array, "B K S H"], width: int):
        rows, length = k.shape[0] * width, k.shape[2]
        own = jnp.arange(rows, dtype=jnp.int32) % width  # [R]: every slot of row r is its own
        beams = lambda a: jnp.repeat(a[:, :, None], width, axis=2)  # --> [B, K, W, S, H]
        origin = jnp.broadcast_to(own[:, None], (rows, length))  # [R, S]
        return cls(k=beams(k), v=beams(v), origin=origin, width=width)

    @property
    def length(self) -> int:
        return self.k.shape[-2]

    def rows(self) -> tuple[Array, Array]:
        """Keys and values ``[R, K, S, H]`` (slots as each row wrote them, not through origin)."""
        per_row = lambda x: jnp.swapaxes(x, 1, 2).reshape(-1, x.shape[1], *x.shape[3:])
        return per_row(self.k), per_row(self.v)

    def write(self, k: Float[Array, "R T K H"], v: Float[Array, "R T K H"], start) -> BeamKVCache:
        """Keys/values into each row's own slots; ``origin`` then names the row's own beam there."""
        rows, length = k.shape[:2]
        batch, width = rows // self.width, self.width
        own = jnp.arange(rows, dtype=jnp.int32) % width  # [R]
        if jnp.ndim(start) == 0:
            beams_in_heads = lambda x: x.reshape(batch, width, *x.shape[1:]).transpose(
                0, 3, 1, 2, 4
            )  # [R, T, K, H] --> [B, K, W, T, H]
            origin = _update(self.origin, jnp.broadcast_to(own[:, None], (rows, length)), start, 1)
            return self.replace(
                k=_update(self.k, beams_in_heads(k), start, 3),
                v=_update(self.v, beams_in_heads(v), start, 3),
                origin=origin,
            )
        _one_slot("BeamKVCache.write", k)
        entry = jnp.arange(rows) // width  # [R]
        put = lambda cache, new: cache.at[entry, :, own, start].set(new[:, 0].astype(cache.dtype))
        origin = self.origin.at[jnp.arange(rows), start].set(own)  # [R, S]
        return self.replace(k=put(self.k, k), v=put(self.v, v), origin=origin)

    def read(self, slots: Int[Array, "R M"]) -> tuple[Array, Array]:
        """``KVCache.read`` through the origin table: slot t of row r from beam ``origin[r, t]``."""
        entry = (jnp.arange(slots.shape[0]) // self.width)[:, None]  # [R, 1]
        beam = jnp.take_along_axis(self.origin, slots, axis=1)  # [R, M]
        return self.k[entry, :, beam, slots], self.v[entry, :, beam, slots]

    def attend(
        self,
        q: Float[Array, "R 1 N H"],
        last,
        relative=(None, None),
        bias=None,
        new=None,
        window: int | None = None,
    ):
        """``KVCache.attend`` through the origin table (``new``: slot ``last`` is the row's own).

        With ``new``, equal to writing first when the W rows of an entry are at the same position,
        as a search's are (each row then writes a slot that no other row reads at this step).
        """
        rows, length = q.shape[0], self.length
        last = jnp.broadcast_to(last, (rows,))
        slots = jnp.arange(length)[None, :]  # [1, S]
        mask = window_slots(last, length, window)  # [R, S]
        rel_k, rel_v = (
            None if t is None else jnp.broadcast_to(t, (rows, *t.shape[1:])) for t in relative
        )  # [R, S, H]
        if bias is not None:
            bias = jnp.broadcast_to(bias, (rows, *bias.shape[1:]))  # [R, N, 1, S]
        if new is not None:
            new = (*new, slots == last[:, None])  # + at: [R, S]
        return attend_through_origin(
            q, self.k, self.v, self.origin, mask, rel_k, rel_v, bias, new=new
        )

    def tile_beams(self, width: int):
        raise ValueError("this KVCache is tiled already (a BeamKVCache has an origin table)")

    def reorder_beams(self, indices: Int[Array, " R"]) -> BeamKVCache:
        # Indices stay within each batch entry, so the beams that origin names stay valid.
        return self.replace(origin=jnp.take(self.origin, indices, axis=0))  # [R, S]


@struct.dataclass
class DecoderCache:
    """A decoder's state between steps: one preallocated ``KVCache`` per layer (slot j = position j)."""

    self_attention: tuple[Any, ...]  # KVCache (or BeamKVCache once tiled) per decoder layer

    @property
    def max_length(self) -> int:
        return self.self_attention[0].length


@struct.dataclass
class Memory:
    """The encoder output as the decoder reads it: cross-attention keys/values per layer, the mask.

    Computed once per source (``Transformer.memory``). The search passes it to every step beside the
    state, one copy per batch entry: the W beams of an entry attend to the same copy.
    """

    kv: tuple[KVCache, ...]  # float[B, K, S, H] per decoder layer
    mask: Any  # bool[B, S]: real source positions
