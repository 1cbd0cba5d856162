"""Encoder and decoder layer stacks, pre-norm (default) or post-norm.

Pre-norm:  ``x = x + drop(sublayer(norm(x)))`` for each sublayer, then one final norm on the stack.
Post-norm: ``x = norm(x + drop(sublayer(x)))`` (Vaswani et al. 2017), no final norm.
``TransformerConfig.final_norm`` sets the final norm either way; the norms' kind and epsilon, the
attention and feed-forward options come from the config too.

T5's bucketed relative bias (``relative_attention_num_buckets > 0``, ``t5_buckets.py``): each stack
holds one ``relative_attention_bias`` table ``[buckets, N]`` (Hugging Face keeps it in block 0's
self-attention) and adds the same bias to every layer's self-attention scores, bidirectional in the
encoder, causal in the decoder; a cached step gets the row of its query position.

The decoder stack has three entry points that share one set of parameters: a full pass (teacher forcing),
a prefill of several tokens into a cache, and a one-token cached step.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.models.attention import MultiHeadAttention
from jaxformer.models.cache import DecoderCache, KVCache, Memory
from jaxformer.models.config import TransformerConfig
from jaxformer.models.layers import FeedForward, config_norm
from jaxformer.models.rotary import Rotary
from jaxformer.models.t5_buckets import relative_bias
from jaxformer.typing import Array, Bool, Float, Int


def attention(c: TransformerConfig, self_attention: bool) -> MultiHeadAttention:
    """A self- or cross-attention sublayer with the config's options (Shaw tables, rotary
    positions and the sliding window: self-attention only)."""
    rotary = None
    if self_attention and c.absolute_positions == "rotary":
        rotary = Rotary(c.head_dim, float(c.rope_theta), c.rope_scaling)
    return MultiHeadAttention(
        c.num_heads,
        c.d_model,
        self_attention,
        c.attention_dropout,
        c.maximum_relative_position if self_attention else 0,
        jnp.dtype(c.dtype),
        head_dim=c.head_dim,
        query_scaling=c.query_scaling,
        use_bias=c.attention_bias,
        quantization=c.quantization,
        num_kv_heads=c.kv_heads,
        out_bias=c.has_attention_out_bias,
        rotary=rotary,
        sliding_window=c.sliding_window if self_attention else None,
    )


def bias_table(module: nn.Module, c: TransformerConfig) -> Array | None:
    """The stack's T5 relative bias table ``[buckets, N]``, or None without T5 buckets."""
    if not c.relative_attention_num_buckets:
        return None
    init = nn.initializers.normal(stddev=c.d_model**-0.5)
    shape = (c.relative_attention_num_buckets, c.num_heads)
    return module.param("relative_attention_bias", init, shape)


def feed_forward(c: TransformerConfig) -> FeedForward:
    return FeedForward(
        c.d_model,
        c.ffn_dim,
        c.ffn_dropout,
        jnp.dtype(c.dtype),
        c.activation,
        c.ffn_bias,
        quantization=c.quantization,
    )


class _Sublayers(nn.Module):
    """Shared helpers for the residual wiring of one layer."""

    config: TransformerConfig

    def residual(self, x, norm, fn, deterministic: bool, dropout):
        """Apply ``fn`` in the configured norm position with a dropped-out residual."""
        if self.config.pre_norm:
            out, extra = fn(norm(x))
            return x + dropout(out, deterministic=deterministic), extra
        out, extra = fn(x)
        return norm(x + dropout(out, deterministic=deterministic)), extra


class EncoderLayer(_Sublayers):
    def setup(self):
        c = self.config
        self.self_attention = attention(c, True)
        self.ffn = feed_forward(c)
        self.norm_attention = config_norm(c, "norm_attention")
        self.norm_ffn = config_norm(c, "norm_ffn")
        self.drop = nn.Dropout(c.dropout)

    def __call__(self, x, mask, deterministic: bool = True, bias=None):
        x, _ = self.residual(
            x,
            self.norm_attention,
            lambda h: self.self_attention(h, mask=mask, deterministic=deterministic, bias=bias),
            deterministic,
            self.drop,
        )
        x, _ = self.residual(
            x, self.norm_ffn, lambda h: (self.ffn(h, deterministic), None), deterministic, self.drop
        )
        return x


class Encoder(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(
        self, x: Float[Array, "B S D"], valid: Bool[Array, "B S"], deterministic: bool = True
    ) -> Float[Array, "B S D"]:
        c = self.config
        mask = valid[:, None, None, :]  # [B, 1, 1, S]
        table, bias = bias_table(self, c), None
        if table is not None:
            pos = jnp.arange(x.shape[1])
            bias = relative_bias(table, pos, pos, True, c.relative_attention_max_distance)[None]
        for i in range(c.num_encoder_layers):
            x = EncoderLayer(c, name=f"layer_{i}")(
                x, mask, deterministic, bias
            )  # bias [1, N, S, S]
        if c.has_final_norm:
            x = config_norm(c, "final_norm")(x)
        return x


class DecoderLayer(_Sublayers):
    """Self-attention, optional cross-attention, feed-forward."""

    cross_attention: bool = True

    def setup(self):
        c = self.config
        self.self_attention = attention(c, True)
        self.norm_self = config_norm(c, "norm_self")
        if self.cross_attention:
            self.memory_attention = attention(c, False)
            self.norm_memory = config_norm(c, "norm_memory")
        self.ffn = feed_forward(c)
        self.norm_ffn = config_norm(c, "norm_ffn")
        self.drop = nn.Dropout(c.dropout)

    def _ffn(self, x, deterministic):
        x, _ = self.residual(
            x, self.norm_ffn, lambda h: (self.ffn(h, deterministic), None), deterministic, self.drop
        )
        return x

    def __call__(
        self, x, self_mask, encoded=None, src_valid=None, deterministic: bool = True, bias=None
    ):
        """Full pass; returns the output and the cross-attention probabilities ``[B, N, T, S]``.

        ``encoded [B, S, D]`` is the encoder output, ``src_valid [B, S]`` its real positions;
        ``bias [1, N, T, T]``: T5's relative bias or None."""
        x, _ = self.residual(
            x,
            self.norm_self,
            lambda h: self.self_attention(
                h, mask=self_mask, deterministic=deterministic, bias=bias
            ),
            deterministic,
            self.drop,
        )
        probs = None
        if self.cross_attention:
            x, probs = self.residual(
                x,
                self.norm_memory,
                lambda h: self.memory_attention(
                    h, encoded, src_valid[:, None, None, :], deterministic
                ),
                deterministic,
                self.drop,
            )
        return self._ffn(x, deterministic), probs

    def memory_kv(self, encoded: Float[Array, "B S D"]) -> KVCache:
        return KVCache.of(*self.memory_attention.project_kv(encoded))  # [B, K, S, H]

    def step(self, x, step, self_cache, memory_kv: KVCache | None, memory_mask, bias=None):
        """One cached token per row (inference: no dropout); ``step``: scalar or ``int32[R]``."""
        x, kv = self.residual(
            x,
            self.norm_self,
            lambda h: self.self_attention.self_attend_cached(h, self_cache, step, bias),
            True,
            self.drop,
        )
        probs = None
        if self.cross_attention:
            x, probs = self.residual(
                x,
                self.norm_memory,
                lambda h: self.memory_attention.cross_attend_cached(
                    h, memory_kv.k, memory_kv.v, memory_mask
                ),
                True,
                self.drop,
            )
        return self._ffn(x, True), kv, probs

    def prefill(self, x, self_mask, self_cache: KVCache, bias=None):
        """Several tokens from position 0 (decoder-only prompts), written into the cache."""
        x, kv = self.residual(
            x,
            self.norm_self,
            lambda h: self.self_attention.self_attend_prefill(h, self_cache, self_mask, bias),
            True,
            self.drop,
        )
        return self._ffn(x, True), kv


class DecoderStack(nn.Module):
    """The decoder layers and (pre-norm) the final norm. Embeddings and logits live in the model."""

    config: TransformerConfig
    cross_attention: bool = True

    def setup(self):
        c = self.config
        self.layers = [
            DecoderLayer(c, self.cross_attention, name=f"layer_{i}")
            for i in range(c.num_decoder_layers)
        ]
        if c.has_final_norm:
            self.final_norm = config_norm(c, "final_norm")
        self.relative_attention_bias = bias_table(self, c)

    def _full_bias(self, length: int):
        """T5's causal bias ``[1, N, T, T]`` for positions 0..T-1, or None."""
        if self.relative_attention_bias is None:
            return None
        pos = jnp.arange(length)
        distance = self.config.relative_attention_max_distance
        return relative_bias(self.relative_attention_bias, pos, pos, False, distance)[None]

    def _step_bias(self, step, length: int):
        """T5's bias of one query per row at ``step`` against every slot: ``[1 or R, N, 1, S]``."""
        if self.relative_attention_bias is None:
            return None
        table, distance = self.relative_attention_bias, self.config.relative_attention_max_distance
        slots = jnp.arange(length)
        if jnp.ndim(step) == 0:
            return relative_bias(table, jnp.reshape(step, (1,)), slots, False, distance)[None]
        return relative_bias(table, step, slots, False, distance, per_row=True)

    def _final(self, x):
        return self.final_norm(x) if self.config.has_final_norm else x

    def __call__(self, x, self_mask, encoded=None, src_valid=None, deterministic: bool = True):
        """Full pass; returns ``(y [B, T, D], last layer's cross-attention [B, N, T, S] or None)``."""
        probs, bias = None, self._full_bias(x.shape[1])
        for layer in self.layers:
            x, probs = layer(x, self_mask, encoded, src_valid, deterministic, bias)
        return self._final(x), probs

    def init_cache(self, batch: int, max_length: int) -> DecoderCache:
        """Zeroed self-attention caches of ``max_length`` slots, ``[B, K, S, H]`` each (indirect:
        beams read an origin table)."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        return DecoderCache(
            tuple(
                KVCache.zeros(batch, max_length, c.kv_heads, c.head_dim, dtype, indirect=True)
                for _ in self.layers
            )
        )

    def init_memory(self, encoded: Float[Array, "B S D"], src_valid: Bool[Array, "B S"]) -> Memory:
        """Each layer's cross-attention keys/values of the encoder output, computed once."""
        return Memory(tuple(layer.memory_kv(encoded) for layer in self.layers), src_valid)

    def step(
        self,
        x: Float[Array, "R 1 D"],
        step: Int[Array, ""] | Int[Array, " R"],
        cache: DecoderCache,
        memory: Memory | None = None,
    ) -> tuple[Float[Array, "R 1 D"], DecoderCache, Float[Array, "R N 1 S"] | None]:
        """One token per row; ``memory`` (cross-attention only) has one entry per W rows."""
        new_self, probs = [], None
        bias = self._step_bias(step, cache.max_length)  # [1 or R, N, 1, S] or None
        for i, layer in enumerate(self.layers):
            kv = memory.kv[i] if self.cross_attention else None
            mask = memory.mask if self.cross_attention else None
            x, new, probs = layer.step(x, step, cache.self_attention[i], kv, mask, bias)
            new_self.append(new)
        return self._final(x), DecoderCache(tuple(new_self)), probs

    def prefill(self, x: Float[Array, "B T D"], self_mask, cache: DecoderCache):
        new_self, bias = [], self._full_bias(x.shape[1])
        for i, layer in enumerate(self.layers):
            x, kv = layer.prefill(x, self_mask, cache.self_attention[i], bias)
            new_self.append(kv)
        return self._final(x), cache.replace(self_attention=tuple(new_self))
