"""A decoder-only causal language model sharing the decoder stack of the Transformer.

- ``__call__(ids, valid=None) -> logits [B, T, V]``: the full causal pass (training, scoring).
- ``init_cache(batch, max_length) -> DecoderCache`` (no memory).
- ``prefill(ids [B, P], cache) -> (logits [B, P, V], cache)``: a prompt of P tokens in one pass,
  its keys/values written to slots 0..P-1.
- ``decode_step(ids [R], step, cache) -> (logits [R, V], cache, None)``: one token per row at position
  ``step``, a scalar or ``int32[R]`` (each row at its own position: prompts of different lengths).

Every option of ``TransformerConfig`` applies, those of decoder-only checkpoints included (rotary
positions, grouped key/value heads, the sliding window, Gemma's norm; the config's docstring):
GPT-2 is ``positions="learned"``, ``norm="layer"`` with epsilon 1e-5, ``activation="gelu_tanh"``,
biases, a tied output without bias, pre-norm with its final norm and ``embedding_scale=1.0``; Llama,
Mistral, Qwen2 and Gemma are ``positions="rotary"``, RMS norms, gated feed-forwards without biases
and ``embedding_scale=1.0`` (Gemma: ``None``, i.e. sqrt(d_model)).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.models.blocks import DecoderStack
from jaxformer.models.cache import DecoderCache
from jaxformer.models.config import TransformerConfig
from jaxformer.models.embeddings import (
    embed,
    embedding_norm,
    learned_positions,
    output_logits,
    output_parameters,
    token_embedding,
)
from jaxformer.models.encoder_decoder import check_length
from jaxformer.models.masks import self_attention_mask
from jaxformer.typing import Array, Bool, Float, Int


class DecoderOnlyLM(nn.Module):
    INPUTS: ClassVar[tuple[str, ...]] = ("ids",)  # the token arrays __call__ takes

    config: TransformerConfig

    def setup(self):
        c = self.config
        self.embedding = token_embedding(c, c.vocab_size, "embedding")
        self.positions = learned_positions(c, "positions")
        self.embedding_norm = embedding_norm(c, "embedding_norm")
        self.decoder = DecoderStack(c, cross_attention=False)
        self.output, self.output_bias, self.final_logits_bias = output_parameters(self, c)
        self.drop = nn.Dropout(c.dropout)

    def _embed(self, ids, positions):
        return embed(self.embedding, self.positions, self.embedding_norm, ids, positions)

    def _logits(self, y):
        return output_logits(
            self.config, y, self.embedding, self.output, self.output_bias, self.final_logits_bias
        )

    def __call__(
        self,
        ids: Int[Array, "B T"],
        valid: Bool[Array, "B T"] | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "B T V"]:
        check_length("ids", ids.shape[1], self.config)
        if valid is None:
            valid = jnp.ones(ids.shape, bool)
        x = self.drop(self._embed(ids, jnp.arange(ids.shape[1])), deterministic=deterministic)
        mask = self_attention_mask(valid, causal=True, window=self.config.sliding_window)
        y, _ = self.decoder(x, mask, deterministic=deterministic)
        return self._logits(y)

    def init_cache(self, batch: int, max_length: int) -> DecoderCache:
        check_length("max_length", max_length, self.config)
        return self.decoder.init_cache(batch, max_length)

    def prefill(
        self, ids: Int[Array, "B P"], cache: DecoderCache
    ) -> tuple[Float[Array, "B P V"], DecoderCache]:
        if ids.shape[1] > cache.max_length:
            raise ValueError(
                f"prompt length {ids.shape[1]} exceeds the cache length {cache.max_length}"
            )
        x = self._embed(ids, jnp.arange(ids.shape[1]))
        valid = jnp.ones(ids.shape, bool)
        mask = self_attention_mask(valid, causal=True, window=self.config.sliding_window)
        y, cache = self.decoder.prefill(x, mask, cache)
        return self._logits(y), cache

    def decode_step(
        self,
        ids: Int[Array, " R"],
        step: int | Int[Array, ""] | Int[Array, " R"],
        cache: DecoderCache,
    ) -> tuple[Float[Array, "R V"], DecoderCache, None]:
        step = jnp.asarray(step, jnp.int32)
        x = self._embed(ids[:, None], step[None] if step.ndim == 0 else step[:, None])  # [R, 1, D]
        y, cache, _ = self.decoder.step(x, step, cache)
        return self._logits(y[:, 0]), cache, None
