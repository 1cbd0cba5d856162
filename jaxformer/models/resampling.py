"""Shortening and upsampling for the Hourglass LM (Nawrot et al. 2021, section 3.2).

Every module takes the relative factor ``K`` of its level and works in two modes that share parameters:
a full pass over a whole sequence, and one cached decode step. ``hourglass.py`` explains the wiring, the
shift and why it is causal; here each module only has to respect one rule: **a shortened vector is a
function of its own group of K vectors, and an upsampled vector at fine position t uses only the coarse
vectors j <= t // K** (the coarse vector j is complete once fine position j*K has been seen).

Shortening ``groups [B, T1, K, D] -> [B, T1, D]`` (the caller builds the groups from the shifted sequence):

- ``average``:   the mean of the K vectors.
- ``linear``:    concatenate the K vectors ``[K*D]`` and project them to D.
- ``attention``: the mean queries its own K-vector window (cross-attention, no mask: the window is one
  group), added as a residual, then a residual feed-forward. Pre-norm on both.

Upsampling ``coarse [B, T1, D], residual [B, T, D] -> [B, T, D]`` (the residual is the level's input
stream before the shift; it is added here):

- ``repeat``:    ``u[t] = coarse[t // K] + residual[t]``.
- ``linear``:    project each coarse vector to ``[K*D]``, reshape to K vectors; ``u[t]`` takes slice
  ``t mod K`` of coarse vector ``t // K``, plus the residual.
- ``attention``: ``u`` = repeat + residual, then ``u`` queries the coarse sequence causally
  (coarse j is visible to t iff ``j <= t // K``), residual, then a residual feed-forward.

For decoding, ``write(coarse_j, j, cache)`` stores what the upsampler needs from a freshly computed
coarse vector (attention: its keys/values in slot j; the others need nothing), and
``step(coarse_j, residual_t, t, cache)`` produces ``u[t]`` from the latest coarse vector ``j = t // K``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.models.attention import MultiHeadAttention
from jaxformer.models.cache import KVCache
from jaxformer.models.layers import FeedForward, layer_norm
from jaxformer.typing import Array, Float, Int


class _Resampler(nn.Module):
    """Fields shared by every shortening and upsampling module (so any pair is built the same way)."""

    factor: int  # K, relative to the level's input
    d_model: int
    num_heads: int
    ffn_dim: int
    dtype: Any = jnp.float32


class _AttentionRefiner(_Resampler):
    """``x + attend(norm(x), norm(memory))`` then ``x + ffn(norm(x))``: the attention resamplers' core."""

    def setup(self):
        self.attention = MultiHeadAttention(
            self.num_heads, self.d_model, self_attention=False, dtype=self.dtype
        )
        self.norm_query = layer_norm("norm_query", self.dtype)
        self.norm_memory = layer_norm("norm_memory", self.dtype)
        self.ffn = FeedForward(self.d_model, self.ffn_dim, dtype=self.dtype)
        self.norm_ffn = layer_norm("norm_ffn", self.dtype)

    def _refine(self, x, attend):
        x = x + attend(self.norm_query(x))
        return x + self.ffn(self.norm_ffn(x))


# --- Shortening ---------------------------------------------------------------------------------------


class AveragePooling(_Resampler):
    def __call__(self, groups: Float[Array, "B T K D"]) -> Float[Array, "B T D"]:
        return groups.mean(axis=2)


class LinearPooling(_Resampler):
    @nn.compact
    def __call__(self, groups: Float[Array, "B T K D"]) -> Float[Array, "B T D"]:
        b, t, k, d = groups.shape
        flat = groups.reshape(b, t, k * d)  # [B, T1, K*D]
        return nn.Dense(self.d_model, dtype=self.dtype, name="project")(flat)


class AttentionPooling(_AttentionRefiner):
    def __call__(self, groups: Float[Array, "B T K D"]) -> Float[Array, "B T D"]:
        b, t, k, d = groups.shape
        window = groups.reshape(b * t, k, d)  # [B*T1, K, D]: one attention problem per group
        pooled = window.mean(axis=1, keepdims=True)  # [B*T1, 1, D]
        memory = self.norm_memory(window)
        out = self._refine(pooled, lambda q: self.attention(q, memory)[0])
        return out.reshape(b, t, d)


# --- Upsampling ---------------------------------------------------------------------------------------


class RepeatUpsampling(_Resampler):
    def __call__(
        self, coarse: Float[Array, "B T1 D"], residual: Float[Array, "B T D"]
    ) -> Float[Array, "B T D"]:
        return jnp.repeat(coarse, self.factor, axis=1)[:, : residual.shape[1]] + residual

    def init_cache(self, batch: int, coarse_length: int) -> None:
        return None

    def write(self, coarse: Float[Array, "B 1 D"], index: Int[Array, ""], cache):
        return cache

    def step(
        self,
        coarse: Float[Array, "B 1 D"],
        residual: Float[Array, "B 1 D"],
        position: Int[Array, ""],
        cache,
    ) -> Float[Array, "B 1 D"]:
        return coarse + residual


class LinearUpsampling(RepeatUpsampling):
    def setup(self):
        self.project = nn.Dense(self.factor * self.d_model, dtype=self.dtype, name="project")

    def _expand(self, coarse):
        b, t1, d = coarse.shape
        return self.project(coarse).reshape(b, t1 * self.factor, d)  # [B, T1, K*D] -> [B, T1*K, D]

    def __call__(self, coarse, residual):
        return self._expand(coarse)[:, : residual.shape[1]] + residual

    def step(self, coarse, residual, position, cache):
        slices = self._expand(coarse)  # [B, K, D]: the K fine vectors of the latest group
        return jax.lax.dynamic_slice_in_dim(slices, position % self.factor, 1, axis=1) + residual


class AttentionUpsampling(_AttentionRefiner):
    def __call__(
        self, coarse: Float[Array, "B T1 D"], residual: Float[Array, "B T D"]
    ) -> Float[Array, "B T D"]:
        t, t1 = residual.shape[1], coarse.shape[1]
        up = jnp.repeat(coarse, self.factor, axis=1)[:, :t] + residual  # [B, T, D]
        visible = jnp.arange(t1)[None, :] <= (jnp.arange(t) // self.factor)[:, None]  # [T, T1]
        memory = self.norm_memory(coarse)
        return self._refine(up, lambda q: self.attention(q, memory, visible[None, None])[0])

    def init_cache(self, batch: int, coarse_length: int) -> KVCache:
        h = self.d_model // self.num_heads
        return KVCache.zeros(batch, coarse_length, self.num_heads, h, self.dtype)

    def write(self, coarse: Float[Array, "B 1 D"], index: Int[Array, ""], cache: KVCache):
        """Keys/values of the coarse vector ``index`` into slot ``index``."""
        k, v = self.attention.project_kv(self.norm_memory(coarse))  # [B, 1, N, H]
        return cache.write(k, v, index)

    def step(self, coarse, residual, position, cache: KVCache):
        visible = jnp.arange(cache.length) <= position // self.factor  # [S1]
        mask = jnp.broadcast_to(visible[None], (residual.shape[0], cache.length))  # [B, S1]
        attend = lambda q: self.attention.cross_attend_cached(q, cache.k, cache.v, mask)[0]
        return self._refine(coarse + residual, attend)


SHORTENING = {"average": AveragePooling, "linear": LinearPooling, "attention": AttentionPooling}
UPSAMPLING = {
    "repeat": RepeatUpsampling,
    "linear": LinearUpsampling,
    "attention": AttentionUpsampling,
}
