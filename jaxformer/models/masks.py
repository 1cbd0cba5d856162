"""Attention masks. ``True`` means "may attend"; every mask broadcasts to ``[B, N, T, S]``.

A sliding window W (Mistral; the idea of local attention windows: Beltagy et al. 2020, Longformer)
keeps, of the causal keys j <= i of query i, those with ``i - j < W``: the query itself and the
W - 1 keys before it, as transformers' ``sliding_window_causal_mask_function`` (``masking_utils.py``:
``kv_idx > q_idx - sliding_window`` and ``kv_idx <= q_idx``) does.
"""

import jax.numpy as jnp

from jaxformer.typing import Array, Bool, Int


def padding_mask(ids: Int[Array, "B S"], pad_id: int) -> Bool[Array, "B S"]:
    """True at real tokens, False at padding."""
    return ids != pad_id


def causal_mask(length: int, window: int | None = None) -> Bool[Array, "T T"]:
    """Lower-triangular: query i may attend to keys j <= i (and ``i - j < window`` if given)."""
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))
    if window is not None:
        mask = mask & jnp.triu(jnp.ones((length, length), dtype=bool), 1 - window)
    return mask


def key_mask(valid: Bool[Array, "B S"]) -> Bool[Array, "B 1 1 S"]:
    """A per-key mask (padding of the keys) in the ``[B, N, T, S]`` broadcast layout."""
    return valid[:, None, None, :]


def self_attention_mask(
    valid: Bool[Array, "B T"], causal: bool, window: int | None = None
) -> Bool[Array, "B 1 T T"]:
    """Padding of the keys, combined with the causal mask (of ``window``) when ``causal``."""
    mask = key_mask(valid)  # [B, 1, 1, T]
    if causal:
        mask = mask & causal_mask(valid.shape[1], window)[None, None]  # [B, 1, T, T]
    return mask


def cache_mask(step: Int[Array, ""], cache_length: int) -> Bool[Array, " S"]:
    """Cache slots a one-token query at absolute position ``step`` may attend to: ``j <= step``."""
    return jnp.arange(cache_length) <= step


def window_slots(
    last: Int[Array, ""] | Int[Array, " R"], length: int, window: int | None
) -> Bool[Array, "1 S"] | Bool[Array, "R S"]:
    """The cache slots a query at position ``last`` (a scalar or one per row) may read: ``j <= last``
    and, with a window, ``last - j < window``."""
    slots = jnp.arange(length)[None, :]  # [1, S]
    last = jnp.reshape(last, (-1, 1))  # [1, 1] or [R, 1]
    mask = slots <= last
    if window is not None:
        mask = mask & (slots > last - window)
    return mask
