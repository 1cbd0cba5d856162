"""The result of a search, and how the per-step records become it (backtracking, ordering)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxformer.decoding.gather_tree import gather_tree, gather_tree_from_array
from jaxformer.typing import Array, Float, Int


class DecodingResult(NamedTuple):
    """Hypotheses per batch entry, best first (``W`` = the strategy's ``num_hypotheses``)."""

    ids: Int[Array, "B W T"]  # T = max_length; end_id after EOS and after the last step run
    lengths: Int[Array, "B W"]  # tokens before EOS, EOS not counted
    log_probs: Float[Array, "B W"]  # cumulative log-probability (EOS included)
    scores: Float[Array, "B W"]  # the ranking score, penalties included
    attention: Float[Array, "B W T S"] | None
    steps: Int[Array, ""]  # steps run before every row had finished (OpenNMT-tf's loop count)
    trace: dict | None = None  # per-step tensors ``[T, ...]`` when ``trace=True``


def finalize(
    records, final, strategy, end_id, batch, max_length, source_len, return_attention, compat
) -> DecodingResult:
    width = strategy.width
    steps = jnp.sum(records.ran.astype(jnp.int32))
    split = lambda x: x.reshape(
        x.shape[0], batch, width, *x.shape[2:]
    )  # [T, R, ...] -> [T, B, W, ...]
    to_batch = lambda x: x.reshape(batch, width, *x.shape[1:])  # [R, ...] -> [B, W, ...]
    step_ids, parents = split(records.word_ids), split(records.beam_ids)  # [T, B, W]

    if compat == "opennmt-tf":
        # Backtrack each entry from its own longest hypothesis (its last step), in the row order of
        # that step, while log_probs stay in the row order after the last step run.
        max_lengths = jnp.max(to_batch(final.lengths), axis=1)  # [B]
    else:
        # Backtrack everything from the last step run, so every field describes the same rows.
        max_lengths = jnp.full([batch], max_length, jnp.int32)
    ids = gather_tree(step_ids, parents, max_lengths, end_id)  # [T, B, W]
    lengths = jnp.sum(ids != end_id, axis=0).astype(jnp.int32)  # [B, W]
    log_probs, scores = to_batch(final.cum_log_probs), to_batch(final.scores)
    ids = jnp.transpose(ids, (1, 2, 0))  # [B, W, T]

    attention = None
    if return_attention:
        per_step = split(records.attention)  # [T, B, W, S]
        t = jnp.arange(max_length)[None, None, :, None]  # [1, 1, T, 1]
        if compat == "opennmt-tf":
            # tfa's gather_tree_from_array on the pre-reorder attention, then the last step dropped.
            attention = gather_tree_from_array(per_step, parents, lengths)  # [T, B, W, S]
            attention = jnp.transpose(attention, (1, 2, 0, 3))  # [B, W, T, S]
            attention = jnp.where(t < steps - 1, attention, 0.0)
        else:
            rows = gather_tree_from_array(per_step, parents, jnp.full_like(lengths, max_length))
            attention = jnp.transpose(rows, (1, 2, 0, 3))  # [B, W, T, S]
            # Keep the tokens of the hypothesis and its EOS; zeros after.
            attention = jnp.where(t <= lengths[:, :, None, None], attention, 0.0)

    trace = None
    if records.trace is not None:
        trace = dict(records.trace)

    if compat is None and width > 1:
        order = jnp.argsort(-scores, axis=1, stable=True)  # [B, W] best first
        pick = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
        ids, lengths, log_probs, scores = pick(ids), pick(lengths), pick(log_probs), pick(scores)
        attention = None if attention is None else pick(attention)

    n = strategy.num_hypotheses
    return DecodingResult(
        ids=ids[:, :n],
        lengths=lengths[:, :n],
        log_probs=log_probs[:, :n],
        scores=scores[:, :n],
        attention=None if attention is None else attention[:, :n],
        steps=steps,
        trace=trace,
    )
