"""Attention masks. ``True`` means "may attend"; every mask broadcasts to ``[B, N, T, S]``."""

import jax.numpy as jnp

from jaxformer.typing import Array, Bool, Int


def padding_mask(ids: Int[Array, "B S"], pad_id: int) -> Bool[Array, "B S"]:
    """True at real tokens, False at padding."""
    return ids != pad_id


def causal_mask(length: int) -> Bool[Array, "T T"]:
    """Lower-triangular: query i may attend to keys j <= i."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))


def key_mask(valid: Bool[Array, "B S"]) -> Bool[Array, "B 1 1 S"]:
    """A per-key mask (padding of the keys) in the ``[B, N, T, S]`` broadcast layout."""
    return valid[:, None, None, :]


def self_attention_mask(valid: Bool[Array, "B T"], causal: bool) -> Bool[Array, "B 1 T T"]:
    """Padding of the keys, combined with the causal mask when ``causal``."""
    mask = key_mask(valid)  # [B, 1, 1, T]
    if causal:
        mask = mask & causal_mask(valid.shape[1])[None, None]  # [B, 1, T, T]
    return mask


def cache_mask(step: Int[Array, ""], cache_length: int) -> Bool[Array, " S"]:
    """Cache slots a one-token query at absolute position ``step`` may attend to: ``j <= step``."""
    return jnp.arange(cache_length) <= step
