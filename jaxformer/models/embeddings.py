"""A model's inputs and outputs as its config describes them, shared by both model families.

Inputs, per side (source, target, or the LM's one stream):
``x = embed(ids) * scale + absolute positions``, then an optional norm (BART's ``layernorm_embedding``).
Token tables may be shared between sides; learned position tables and embedding norms never are
(BART shares its token table but has one position table and one embedding norm per side).

Outputs: ``logits = y W + b`` with an untied projection (``output``, bias per ``has_output_bias``), or
``(y * s) E^T (+ output_bias)`` tied to the target table E (``s = d_model**-0.5`` for T5 v1.0's
``tied_output_scale``, else 1; OpenNMT-tf keeps a bias on its tied projection), then in float32 the
optional ``final_logits_bias`` (Marian, BART): zero-initialised and not trained (a stop-gradient;
loaders set it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.models.config import TransformerConfig
from jaxformer.models.layers import LearnedPositions, TokenEmbedding, config_norm
from jaxformer.models.quantization import dense_options
from jaxformer.typing import Array, Float, Int


def token_embedding(c: TransformerConfig, vocab_size: int, name: str) -> TokenEmbedding:
    return TokenEmbedding(
        vocab_size,
        c.d_model,
        c.max_len,
        c.absolute_positions == "sinusoidal",
        jnp.dtype(c.dtype),
        scale=c.embedding_scale,
        position_layout=c.position_layout,
        position_rate_denominator=c.position_rate_denominator,
        position_offset=c.position_offset,
        quantization=c.quantization,
        name=name,
    )


def learned_positions(c: TransformerConfig, name: str) -> LearnedPositions | None:
    if c.absolute_positions != "learned":
        return None
    return LearnedPositions(c.max_len, c.d_model, c.position_offset, jnp.dtype(c.dtype), name=name)


def embedding_norm(c: TransformerConfig, name: str) -> nn.Module | None:
    return config_norm(c, name) if c.embedding_norm else None


def embed(
    embedding: TokenEmbedding,
    positions_table: LearnedPositions | None,
    norm: nn.Module | None,
    ids: Int[Array, "B T"],
    positions: Int[Array, " T"] | Int[Array, "B T"],
) -> Float[Array, "B T D"]:
    """Token embeddings with their positions and optional norm (``positions`` as TokenEmbedding's)."""
    x = embedding(ids, positions)  # [B, T, D]
    if positions_table is not None:
        learned = positions_table(positions)  # [T, D] or [B, T, D]
        x = x + (learned[None] if positions.ndim == 1 else learned)
    return x if norm is None else norm(x)


def output_parameters(module: nn.Module, c: TransformerConfig):
    """``(output Dense or None, tied output bias or None, final_logits_bias or None)``, made in a
    model's ``setup``; parameter names ``output``, ``output_bias``, ``final_logits_bias``."""
    dense = tied_bias = final_bias = None
    zeros = nn.initializers.zeros_init()
    if not c.share_output_embeddings:
        dense = nn.Dense(
            c.vocab_size,
            use_bias=c.has_output_bias,
            dtype=jnp.dtype(c.dtype),
            name="output",
            **dense_options(c.quantization),
        )
    elif c.has_output_bias:
        tied_bias = module.param("output_bias", zeros, (c.vocab_size,))
    if c.final_logits_bias:
        final_bias = module.param("final_logits_bias", zeros, (c.vocab_size,))
    return dense, tied_bias, final_bias


def output_logits(
    c: TransformerConfig,
    y: Float[Array, "... D"],
    embedding: TokenEmbedding,
    dense: nn.Module | None,
    tied_bias: Float[Array, " V"] | None,
    final_bias: Float[Array, " V"] | None,
) -> Float[Array, "... V"]:
    """Logits in float32 from the last hidden states (see the module docstring)."""
    if dense is not None:
        logits = dense(y)
    else:
        if c.tied_output_scale:
            y = y * jnp.asarray(c.d_model**-0.5, y.dtype)
        logits = embedding.attend(y)
        if tied_bias is not None:
            logits = logits + _leading_ones(tied_bias.astype(logits.dtype), logits.ndim)
    logits = logits.astype(jnp.float32)
    if final_bias is not None:
        logits = logits + _leading_ones(jax.lax.stop_gradient(final_bias), logits.ndim)
    return logits


def _leading_ones(bias: Float[Array, " V"], ndim: int) -> Array:
    return bias.reshape((1,) * (ndim - 1) + bias.shape)  # [V] --> [1, ..., V]
