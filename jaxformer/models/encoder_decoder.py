"""The encoder-decoder Transformer (Vaswani et al. 2017) with OpenNMT-tf's options.

Used purely: ``model.apply({"params": params}, ..., method=Transformer.METHOD)``.

- ``encode(src_ids) -> (encoded [B, S, D], src_valid [B, S])``; sources are right-padded with ``pad_id``.
- ``decode(tgt_in_ids, encoded, src_valid) -> (logits [B, T, V], attention [B, T, S])``: teacher forcing.
- ``init_memory(encoded, src_valid) -> Memory``: every decoder layer's cross-attention K/V, computed once.
- ``init_cache(batch, max_length) -> DecoderCache``: the preallocated self-attention K/V.
- ``decode_step(ids [R], step, cache, memory) -> (logits [R, V], cache, attention [R, S])``: one token
  per row at position ``step``, a scalar or ``int32[R]`` (each row at its own position: the serving
  engine's slots); R may be W rows per memory entry (beam search shares the memory). The
  returned attention is the first head of the last layer's cross-attention (OpenNMT-tf's default
  alignment).
- ``__call__(src_ids, tgt_in_ids)``: the training forward pass, ``logits [B, T, V]``.

With ``positions="rotary"`` the encoder's and the decoder's self-attention rotate their queries and
keys (source and target positions from 0); cross-attention has no positions. Grouped key/value heads
apply to every attention, cross-attention included. ``sliding_window`` is refused (decoder-only).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.models.blocks import DecoderStack, Encoder
from jaxformer.models.cache import DecoderCache, Memory
from jaxformer.models.config import TransformerConfig
from jaxformer.models.embeddings import (
    embed,
    embedding_norm,
    learned_positions,
    output_logits,
    output_parameters,
    token_embedding,
)
from jaxformer.models.layers import TokenEmbedding
from jaxformer.models.masks import causal_mask, padding_mask
from jaxformer.typing import Array, Bool, Float, Int


def check_length(name: str, length: int, config: TransformerConfig):
    if length > config.max_len:
        raise ValueError(
            f"{name} has length {length}, more than the model's max_len={config.max_len}"
        )


class Transformer(nn.Module):
    INPUTS: ClassVar[tuple[str, ...]] = ("src_ids", "tgt_in_ids")  # the token arrays __call__ takes

    config: TransformerConfig

    def setup(self):
        c = self.config
        if c.sliding_window is not None:
            raise ValueError(
                f"sliding_window={c.sliding_window} is for decoder-only LMs (DecoderOnlyLM); the "
                "encoder-decoder Transformer does not take it"
            )
        self.target_embedding = token_embedding(c, c.vocab_size, "target_embedding")
        if not c.share_embeddings:
            self.source_embedding = token_embedding(c, c.source_vocab_size, "source_embedding")
        self.source_positions = learned_positions(c, "source_positions")
        self.target_positions = learned_positions(c, "target_positions")
        self.source_embedding_norm = embedding_norm(c, "source_embedding_norm")
        self.target_embedding_norm = embedding_norm(c, "target_embedding_norm")
        self.encoder = Encoder(c)
        self.decoder = DecoderStack(c, cross_attention=True)
        self.output, self.output_bias, self.final_logits_bias = output_parameters(self, c)
        self.drop = nn.Dropout(c.dropout)

    def _source_embedding(self) -> TokenEmbedding:
        return self.target_embedding if self.config.share_embeddings else self.source_embedding

    def _embed_source(self, ids, positions):
        return embed(
            self._source_embedding(),
            self.source_positions,
            self.source_embedding_norm,
            ids,
            positions,
        )

    def _embed_target(self, ids, positions):
        return embed(
            self.target_embedding, self.target_positions, self.target_embedding_norm, ids, positions
        )

    def _logits(self, y):
        return output_logits(
            self.config,
            y,
            self.target_embedding,
            self.output,
            self.output_bias,
            self.final_logits_bias,
        )

    def encode(
        self, src_ids: Int[Array, "B S"], deterministic: bool = True
    ) -> tuple[Float[Array, "B S D"], Bool[Array, "B S"]]:
        check_length("src_ids", src_ids.shape[1], self.config)
        valid = padding_mask(src_ids, self.config.pad_id)  # [B, S]
        x = self._embed_source(src_ids, jnp.arange(src_ids.shape[1]))  # [B, S, D]
        x = self.drop(x, deterministic=deterministic)
        return self.encoder(x, valid, deterministic), valid

    def decode(
        self,
        tgt_in_ids: Int[Array, "B T"],
        encoded: Float[Array, "B S D"],
        src_valid: Bool[Array, "B S"],
        deterministic: bool = True,
    ) -> tuple[Float[Array, "B T V"], Float[Array, "B T S"]]:
        """Teacher forcing: all target positions at once, causally masked."""
        check_length("tgt_in_ids", tgt_in_ids.shape[1], self.config)
        x = self._embed_target(tgt_in_ids, jnp.arange(tgt_in_ids.shape[1]))  # [B, T, D]
        x = self.drop(x, deterministic=deterministic)
        self_mask = causal_mask(tgt_in_ids.shape[1])[None, None]  # [1, 1, T, T]
        y, probs = self.decoder(x, self_mask, encoded, src_valid, deterministic)
        return self._logits(y), probs[:, 0]

    def __call__(
        self, src_ids: Int[Array, "B S"], tgt_in_ids: Int[Array, "B T"], deterministic: bool = True
    ) -> Float[Array, "B T V"]:
        encoded, valid = self.encode(src_ids, deterministic)
        return self.decode(tgt_in_ids, encoded, valid, deterministic)[0]

    def init_memory(self, encoded: Float[Array, "B S D"], src_valid: Bool[Array, "B S"]) -> Memory:
        return self.decoder.init_memory(encoded, src_valid)

    def init_cache(self, batch: int, max_length: int) -> DecoderCache:
        check_length("max_length", max_length, self.config)
        return self.decoder.init_cache(batch, max_length)

    def decode_step(
        self,
        ids: Int[Array, " R"],
        step: int | Int[Array, ""] | Int[Array, " R"],
        cache: DecoderCache,
        memory: Memory,
    ) -> tuple[Float[Array, "R V"], DecoderCache, Float[Array, "R S"]]:
        step = jnp.asarray(step, jnp.int32)
        x = self._embed_target(ids[:, None], step[None] if step.ndim == 0 else step[:, None])
        y, cache, probs = self.decoder.step(x, step, cache, memory)  # [R, 1, D], [R, N, 1, S]
        return self._logits(y[:, 0]), cache, probs[:, 0, 0]
