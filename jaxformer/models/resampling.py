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

For decoding, ``write(coarse, j, cache)`` stores what the upsampler needs from coarse vectors
``j, j+1, ...`` (attention: their keys/values in those slots; the others need nothing): all of them at
once for a prefill, or one per row in a step (``j`` then a scalar or one slot per row).
``step(coarse_j, residual_t, t, cache)`` produces ``u[t]`` from the coarse vector in force,
``j = t // K``; ``t`` is a scalar or one position per row.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.models.attention import MultiHeadAttention
from jaxformer.models.cache import BeamKVCache, KVCache
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

    def write(self, coarse: Float[Array, "B T1 D"], index, cache):
        return cache

    def step(
        self,
        coarse: Float[Array, "R 1 D"],
        residual: Float[Array, "R 1 D"],
        position: Int[Array, ""] | Int[Array, " R"],
        cache,
    ) -> Float[Array, "R 1 D"]:
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
        slices = self._expand(coarse)  # [R, K, D]: the K fine vectors of the group in force
        which = jnp.broadcast_to(jnp.reshape(position % self.factor, (-1, 1, 1)), residual.shape)
        return jnp.take_along_axis(slices, which, axis=1) + residual  # [R, 1, D]: slice t mod K


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
        """The coarse keys/values, one slot per coarse position (indirect: beams read an origin
        table, as the layers' caches do)."""
        h = self.d_model // self.num_heads
        return KVCache.zeros(batch, coarse_length, self.num_heads, h, self.dtype, indirect=True)

    def write(self, coarse: Float[Array, "R T1 D"], index, cache: KVCache | BeamKVCache):
        """Keys/values of coarse vectors ``index .. index+T1-1`` into those slots (``index``: a
        scalar, or one slot per row)."""
        k, v = self.attention.project_kv(self.norm_memory(coarse))  # [R, T1, N, H]
        return cache.write(k, v, index)

    def step(self, coarse, residual, position, cache):
        """Coarse slots ``0 .. position // K`` of each row are visible (the cache's own attention)."""
        attention = self.attention

        def attend(q):  # [R, 1, D] --> [R, 1, D]
            return attention.out(cache.attend(attention.query(q), position // self.factor))

        return self._refine(coarse + residual, attend)


SHORTENING = {"average": AveragePooling, "linear": LinearPooling, "attention": AttentionPooling}
UPSAMPLING = {
    "repeat": RepeatUpsampling,
    "linear": LinearUpsampling,
    "attention": AttentionUpsampling,
}
