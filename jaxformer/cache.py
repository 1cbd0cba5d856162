"""The KV cache: an explicit pytree that a decode step takes and returns.

Every leaf has the batch (or search row) axis first, so a search can tile it to ``B*W`` rows and reorder
it with one gather per leaf. Self-attention keys and values are preallocated to the maximum length and
written one slot per step; cross-attention keys and values are computed once from the encoder memory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxformer.typing import Array, Int, PyTree


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer."""

    # Annotated as Any: pytree leaves are not always arrays (eval_shape, vmap, None placeholders).
    k: Any  # float[B, S, N, H]
    v: Any  # float[B, S, N, H]

    @classmethod
    def zeros(cls, batch: int, length: int, num_heads: int, head_dim: int, dtype) -> KVCache:
        shape = (batch, length, num_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.k.shape[1]


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
    """Gather rows ``indices`` of every leaf (the beam-search reorder)."""
    return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), state)


def tile_batch(state: PyTree, multiplier: int) -> PyTree:
    """Repeat each batch entry ``multiplier`` times along axis 0: ``[b0, b0, b1, b1, ...]``."""
    if multiplier == 1:
        return state
    return jax.tree.map(lambda x: jnp.repeat(x, multiplier, axis=0), state)
