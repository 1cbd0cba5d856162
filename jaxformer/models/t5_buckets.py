"""T5's bucketed relative attention bias (Raffel et al. 2020, section 2.1), the piece shared by both
of its attention stacks.

Each head adds a learned scalar ``bias[bucket(j - i), n]`` to the score of query i and key j. Offsets
``d = j - i`` are put in buckets: in a bidirectional stack (T5's encoder) half of the buckets hold keys
after the query and half keys at or before it; a causal stack (the decoder) uses all of them for
``i - j >= 0``. Within a half of B buckets, the first B/2 hold the distances 0 .. B/2 - 1 exactly, the
rest grow logarithmically up to ``max_distance``, beyond which everything shares the last bucket. The
arithmetic follows Mesh TensorFlow's ``_relative_position_bucket`` as Hugging Face transformers does it
(float32 logarithm, truncated), so bucket boundaries match its checkpoints.

In T5 the first layer of a stack holds the ``[buckets, N]`` table and every layer reuses its bias.
``relative_bias(table, query_positions, key_positions, ...)`` gives ``[N, T, S]`` for shared query
positions, or ``[R, N, 1, S]`` for one query position per row against every cache slot (a cached step).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxformer.typing import Array, Float, Int


def relative_position_bucket(
    relative_position: Int[Array, ...],
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> Int[Array, ...]:
    """The bucket of each offset ``key - query``, in ``[0, num_buckets)``."""
    bucket = jnp.zeros_like(relative_position)
    distance = -relative_position  # > 0: the key is before the query
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (distance < 0).astype(bucket.dtype) * num_buckets
        distance = jnp.abs(distance)
    else:
        distance = jnp.maximum(distance, 0)
    max_exact = num_buckets // 2
    # log(0) is never used (those distances are exact); 1 keeps it finite.
    ratio = jnp.maximum(distance, 1).astype(jnp.float32) / max_exact
    scaled = jnp.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + scaled.astype(bucket.dtype), num_buckets - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


def relative_bias(
    table: Float[Array, "K N"],
    query_positions: Int[Array, " T"] | Int[Array, " R"],
    key_positions: Int[Array, " S"],
    bidirectional: bool,
    max_distance: int,
    per_row: bool = False,
) -> Float[Array, "N T S"] | Float[Array, "R N 1 S"]:
    """Each head's bias for every (query, key) pair from a ``[buckets, N]`` table.

    ``per_row``: ``query_positions`` holds one query per row (a cached step at per-row positions).
    """
    offsets = key_positions[None, :] - query_positions[:, None]  # [T or R, S]
    buckets = relative_position_bucket(offsets, bidirectional, table.shape[0], max_distance)
    bias = jnp.take(table, buckets, axis=0)  # [T or R, S, N]
    if per_row:
        return jnp.transpose(bias, (0, 2, 1))[:, :, None, :]  # [R, N, 1, S]
    return jnp.transpose(bias, (2, 0, 1))  # [N, T, S]
