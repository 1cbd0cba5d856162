"""The result of a search, and how the per-step records become it (backtracking, ordering)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxformer.decoding.gather_tree import gather_tree, gather_tree_from_array, is_end
from jaxformer.typing import Array, Float, Int


class DecodingResult(NamedTuple):
    """Hypotheses per batch entry, best first (``W`` = the strategy's ``num_hypotheses``)."""

    ids: Int[Array, "B W T"]  # T = max_length; end_id after EOS and after the last step run
    lengths: Int[Array, "B W"]  # tokens before EOS, EOS not counted (ids[b, w, lengths] is the EOS)
    log_probs: Float[Array, "B W"]  # cumulative log-probability (EOS included)
    scores: Float[Array, "B W"]  # the ranking score, penalties included
    attention: Float[Array, "B W T S"] | None
    steps: Int[Array, ""]  # steps run before every row had finished (OpenNMT-tf's loop count)
    trace: dict | None = None  # per-step tensors ``[T, ...]`` when ``trace=True``


def finalize(records, final, search) -> DecodingResult:
    """Backtrack the stacked ``records`` ``[T, R, ...]`` into hypotheses, best first.

    ``final`` is the loop's last ``SearchState``; ``search`` its static settings (``search_step.Search``).
    """
    batch, width = search.batch, search.width
    steps = jnp.sum(records.ran.astype(jnp.int32))
    parents = _per_entry(records.beam_ids, batch, width)  # [T, B, W]
    ids = _backtrack(records, final, search)  # [B, W, T]
    before_end = jnp.cumsum(is_end(ids, search.end_ids), axis=-1) == 0  # [B, W, T]
    lengths = jnp.sum(before_end, axis=-1).astype(jnp.int32)  # [B, W]
    log_probs = final.cum_log_probs.reshape(batch, width)
    scores = final.scores.reshape(batch, width)
    attention = None
    if search.return_attention:
        attention = _attention(records, parents, lengths, steps, search)  # [B, W, T, S]
    if search.compat is None and width > 1:
        order = jnp.argsort(-scores, axis=1, stable=True)  # [B, W] best first
        pick = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
        ids, lengths, log_probs, scores = pick(ids), pick(lengths), pick(log_probs), pick(scores)
        attention = None if attention is None else pick(attention)
    n = search.strategy.num_hypotheses
    return DecodingResult(
        ids=ids[:, :n],
        lengths=lengths[:, :n],
        log_probs=log_probs[:, :n],
        scores=scores[:, :n],
        attention=None if attention is None else attention[:, :n],
        steps=steps,
        trace=None if records.trace is None else dict(records.trace),
    )


def _per_entry(x, batch: int, width: int):
    return x.reshape(x.shape[0], batch, width, *x.shape[2:])  # [T, R, ...] --> [T, B, W, ...]


def _backtrack(records, final, search) -> Int[Array, "B W T"]:
    batch, width = search.batch, search.width
    if search.compat == "opennmt-tf":
        # Backtrack each entry from its own longest hypothesis (its last step), in the row order of
        # that step, while log_probs stay in the row order after the last step run.
        max_lengths = jnp.max(final.lengths.reshape(batch, width), axis=1)  # [B]
    else:
        # Backtrack everything from the last step run, so every field describes the same rows.
        max_lengths = jnp.full([batch], search.max_length, jnp.int32)
    step_ids = _per_entry(records.word_ids, batch, width)  # [T, B, W]
    parents = _per_entry(records.beam_ids, batch, width)
    ids = gather_tree(step_ids, parents, max_lengths, search.end_ids)  # [T, B, W]
    return jnp.transpose(ids, (1, 2, 0))  # [B, W, T]


def _attention(records, parents, lengths, steps, search) -> Float[Array, "B W T S"]:
    per_step = _per_entry(records.attention, search.batch, search.width)  # [T, B, W, S]
    t = jnp.arange(search.max_length)[None, None, :, None]  # [1, 1, T, 1]
    if search.compat == "opennmt-tf":
        # tfa's gather_tree_from_array on the pre-reorder attention, then the last step dropped.
        attention = gather_tree_from_array(per_step, parents, lengths)  # [T, B, W, S]
        attention = jnp.transpose(attention, (1, 2, 0, 3))  # [B, W, T, S]
        return jnp.where(t < steps - 1, attention, 0.0)
    rows = gather_tree_from_array(per_step, parents, jnp.full_like(lengths, search.max_length))
    attention = jnp.transpose(rows, (1, 2, 0, 3))  # [B, W, T, S]
    # Keep the tokens of the hypothesis and its EOS; zeros after.
    return jnp.where(t <= lengths[:, :, None, None], attention, 0.0)
