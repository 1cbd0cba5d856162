"""Backtracking beam histories from per-step parent pointers, as reverse ``lax.scan``s.

Both functions follow TensorFlow Addons' ``gather_tree`` semantics, which OpenNMT-tf relies on:
positions at or after ``max_lengths[b]`` get ``end_id``; backtracking starts at ``max_lengths[b] - 1``
from beam w; every position after the first ``end_id`` becomes ``end_id`` (with several end ids,
after the first of any of them, the first id).
"""

import jax
import jax.numpy as jnp

from jaxformer.typing import Array, Float, Int


def _backtrack(
    step_ids: Int[Array, "T B W"], parent_ids: Int[Array, "T B W"], max_lengths: Int[Array, " B"]
) -> tuple[Int[Array, "T B W"], Int[Array, "T B W"]]:
    """Returns ``(ids, beams)``: the token and the beam each final hypothesis had at every step."""
    num_steps, batch, width = step_ids.shape
    start = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))  # [B, W]

    def back(beam, t):  # beam: [B, W] where each final hypothesis sits after step t
        active = (t < max_lengths)[:, None]  # [B, 1]
        token = jnp.take_along_axis(step_ids[t], beam, axis=1)  # [B, W]
        parent = jnp.take_along_axis(parent_ids[t], beam, axis=1)  # [B, W]
        return jnp.where(active, parent, beam), (token, jnp.where(active, beam, -1))

    _, (tokens, beams) = jax.lax.scan(back, start, jnp.arange(num_steps), reverse=True)
    return tokens, beams  # [T, B, W] each; beams is -1 where t >= max_lengths[b]


def is_end(tokens: Int[Array, "..."], end_ids: tuple[int, ...]) -> Array:
    """Whether each token is one of ``end_ids`` (a hypothesis ends on any of them)."""
    return jnp.isin(tokens, jnp.asarray(end_ids, tokens.dtype))


def gather_tree(
    step_ids: Int[Array, "T B W"],
    parent_ids: Int[Array, "T B W"],
    max_lengths: Int[Array, " B"],
    end_id: int | tuple[int, ...],
) -> Int[Array, "T B W"]:
    """Full token histories of the final beams, ``end_id`` after the first end token.

    ``end_id``: one id, or a tuple of ids any of which ends a hypothesis (Llama 3 has three); the
    hypothesis keeps the end token it emitted, and the positions after it get the first id."""
    end_ids = end_id if isinstance(end_id, tuple) else (end_id,)
    tokens, beams = _backtrack(step_ids, parent_ids, max_lengths)
    tokens = jnp.where(beams >= 0, tokens, end_ids[0])
    ends = is_end(tokens, end_ids)
    ended_before = jnp.cumsum(ends, axis=0) - ends  # [T, B, W]
    return jnp.where(ended_before > 0, end_ids[0], tokens)


def gather_tree_from_array(
    values: Float[Array, "T B W ..."],
    parent_ids: Int[Array, "T B W"],
    lengths: Int[Array, "B W"],
) -> Float[Array, "T B W ..."]:
    """Reorder per-step values ``[T, B, W, ...]`` along the backtracked beams (tfa semantics).

    Backtracking starts at ``max_w lengths[b] - 1``; steps at or past a hypothesis' own length keep the
    value of the same beam index, unreordered. OpenNMT-tf uses this for its attention history.
    """
    num_steps = parent_ids.shape[0]
    identity = jnp.broadcast_to(jnp.arange(parent_ids.shape[2], dtype=jnp.int32), parent_ids.shape)
    _, beams = _backtrack(identity, parent_ids, jnp.max(lengths, axis=1))
    in_bound = jnp.arange(num_steps)[:, None, None] < lengths[None]  # [T, B, W]
    beams = jnp.where(in_bound & (beams >= 0), beams, identity)
    index = beams.reshape(beams.shape + (1,) * (values.ndim - 3))
    return jnp.take_along_axis(values, index, axis=2)
