"""Multi-head scaled dot-product attention: full passes (training, prefill) and one cached step.

A ``KVCache`` keeps keys and values heads-major, ``[B, N, S, H]``: the one-token attention of a decode
step is then a batched matrix product over (B, N) that reads the cache where it lies. In the ``[B, S,
N, H]`` layout that the projections produce, XLA:CPU copied every layer's cache (and the memory keys
and values) into that order at every step, which was half the time of a ``small`` batch-64 step.
Full passes (training, prefill) take the projections' layout. Scores are ``q . k / sqrt(H)`` computed and soft-maxed in float32.
A masked score gets the most negative finite value and its probability is then set to exactly 0, so a
fully masked row gives an all-zero attention vector and a zero output, never NaN.

With ``maximum_relative_position > 0`` (self-attention only) the relative key/value tables of Shaw et al.
(2018) add ``q . rel_k[clip(j - i)]`` to the scores and ``sum_j p_ij rel_v[clip(j - i)]`` to the output,
with query and key positions measured absolutely (cache slot j holds position j).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.models.cache import KVCache
from jaxformer.models.positions import relative_positions
from jaxformer.typing import Array, Bool, Float, Int


def dot_product_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S N H"],
    v: Float[Array, "B S N H"],
    mask: Bool[Array, "..."] | None,
    relative_keys: Float[Array, "T S H"] | None = None,
    relative_values: Float[Array, "T S H"] | None = None,
    dropout=None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B N T S"]]:
    """Softmax attention of already-projected heads; returns the output and the probabilities.

    ``dropout`` (training only) maps the probabilities to the weights actually applied to the values;
    the returned probabilities are the undropped ones.
    """
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, S, N, H] --> [B, N, S, H]
    return attend_heads_major(
        q, heads_major(k), heads_major(v), mask, relative_keys, relative_values, dropout
    )


def attend_heads_major(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B N S H"],
    v: Float[Array, "B N S H"],
    mask: Bool[Array, "..."] | None,
    relative_keys: Float[Array, "T S H"] | None = None,
    relative_values: Float[Array, "T S H"] | None = None,
    dropout=None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B N T S"]]:
    """``dot_product_attention`` with keys and values in the cache's ``[B, N, S, H]`` layout."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("BTNH,BNSH->BNTS", q, k, preferred_element_type=jnp.float32)
    if relative_keys is not None:
        scores += jnp.einsum("BTNH,TSH->BNTS", q, relative_keys, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, N, T, S] float32
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)  # fully masked rows -> zeros, not a uniform spread
    weights = (probs if dropout is None else dropout(probs)).astype(v.dtype)
    out = jnp.einsum("BNTS,BNSH->BTNH", weights, v)
    if relative_values is not None:
        out += jnp.einsum("BNTS,TSH->BTNH", weights, relative_values)
    return out, probs


class MultiHeadAttention(nn.Module):
    """Multi-head attention with fused projections (QKV for self-attention, KV for cross-attention).

    Methods: ``__call__`` for a full pass, ``project_kv`` for the cross-attention memory (computed once
    per source), ``attend_cached`` for a one-token query against caller-held keys and values.
    """

    num_heads: int
    d_model: int
    self_attention: bool = True
    dropout: float = 0.0
    maximum_relative_position: int = 0
    dtype: Any = jnp.float32

    def setup(self):
        n, h = self.num_heads, self.d_model // self.num_heads
        dense = lambda features, axis, name: nn.DenseGeneral(
            features, axis=axis, dtype=self.dtype, name=name
        )
        if self.self_attention:
            self.qkv = dense((3, n, h), -1, "qkv")
        else:
            self.query = dense((n, h), -1, "query")
            self.kv = dense((2, n, h), -1, "kv")
        self.out = dense(self.d_model, (-2, -1), "out")
        self.attention_dropout = nn.Dropout(self.dropout)
        if self.maximum_relative_position > 0:
            if not self.self_attention:
                raise ValueError("relative positions apply to self-attention only")
            init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
            rows = 2 * self.maximum_relative_position + 1
            self.relative_keys = self.param("relative_keys", init, (rows, h))
            self.relative_values = self.param("relative_values", init, (rows, h))

    def _relative(self, query_pos: Int[Array, " T"], key_pos: Int[Array, " S"]):
        if self.maximum_relative_position == 0:
            return None, None
        idx = relative_positions(query_pos, key_pos, self.maximum_relative_position)  # [T, S]
        return (
            self.relative_keys[idx].astype(self.dtype),  # [T, S, H]
            self.relative_values[idx].astype(self.dtype),
        )

    def project_kv(self, memory: Float[Array, "B S D"]) -> tuple[Array, Array]:
        """Keys and values ``[B, S, N, H]`` of the cross-attention memory."""
        kv = self.kv(memory)  # [B, S, 2, N, H]
        return kv[:, :, 0], kv[:, :, 1]

    def __call__(
        self,
        x: Float[Array, "B T D"],
        memory: Float[Array, "B S D"] | None = None,
        mask: Bool[Array, "..."] | None = None,
        deterministic: bool = True,
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B N T S"]]:
        """Full pass. Self-attention when ``memory`` is None, else cross-attention to ``memory``."""
        if self.self_attention:
            qkv = self.qkv(x)  # [B, T, 3, N, H]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            pos = jnp.arange(x.shape[1])
            rel_k, rel_v = self._relative(pos, pos)
        else:
            q = self.query(x)  # [B, T, N, H]
            k, v = self.project_kv(memory)  # [B, S, N, H]
            rel_k = rel_v = None
        out, probs = self._attend(q, k, v, mask, rel_k, rel_v, deterministic)
        return self.out(out), probs

    def _attend(self, q, k, v, mask, rel_k, rel_v, deterministic):
        dropout = None
        if not deterministic and self.dropout > 0.0:
            dropout = lambda p: self.attention_dropout(p, deterministic=False)
        return dot_product_attention(q, k, v, mask, rel_k, rel_v, dropout)

    def self_attend_cached(
        self, x: Float[Array, "B 1 D"], cache: KVCache, step: Int[Array, ""]
    ) -> tuple[Float[Array, "B 1 D"], KVCache]:
        """One token at absolute position ``step``: write its K/V into slot ``step``, attend to 0..step."""
        qkv = self.qkv(x)  # [B, 1, 3, N, H]  the projections see one token
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cache = cache.write(k, v, step)  # [B, N, S, H]
        slots = jnp.arange(cache.length)  # [S]
        mask = (slots <= step)[None, None, None, :]  # [1, 1, 1, S]
        rel_k, rel_v = self._relative(step[None], slots)  # [1, S, H]
        if cache.origin is None:
            out, _ = attend_heads_major(q, cache.k, cache.v, mask, rel_k, rel_v)
        else:
            out = _attend_through_origin(q, cache, mask, rel_k, rel_v)
        return self.out(out), cache

    def self_attend_prefill(
        self, x: Float[Array, "B T D"], cache: KVCache, mask: Bool[Array, "..."]
    ) -> tuple[Float[Array, "B T D"], KVCache]:
        """A prompt of T tokens at positions 0..T-1: causal attention, and its K/V written to the cache."""
        qkv = self.qkv(x)  # [B, T, 3, N, H]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        pos = jnp.arange(x.shape[1])
        rel_k, rel_v = self._relative(pos, pos)
        out, _ = dot_product_attention(q, k, v, mask, rel_k, rel_v)
        return self.out(out), cache.write(k, v, 0)

    def cross_attend_cached(
        self,
        x: Float[Array, "R T D"],
        memory_k: Float[Array, "B N S H"],
        memory_v: Float[Array, "B N S H"],
        memory_mask: Bool[Array, "B S"],
    ) -> tuple[Float[Array, "R T D"], Float[Array, "R N T S"]]:
        """Cross-attention against memory keys/values computed once (``project_kv``, heads-major).

        ``x`` may have W rows per memory entry (``R = B*W`` search rows laid out ``[b0w0, b0w1, ...,
        b1w0, ...]``): the W queries of an entry then attend to its one copy of the memory, so the
        memory never has to be tiled to ``R`` rows nor reordered with the beams.
        """
        q = self.query(x)  # [R, T, N, H]
        rows, length = q.shape[:2]
        batch = memory_k.shape[0]
        if rows % batch:
            raise ValueError(f"{rows} query rows do not split evenly over {batch} memory entries")
        width = rows // batch
        grouped = q.reshape(batch, width * length, *q.shape[2:])  # --> [B, W*T, N, H]
        out, probs = attend_heads_major(
            grouped, memory_k, memory_v, memory_mask[:, None, None, :]
        )  # [B, W*T, N, H], probs [B, N, W*T, S]
        out = out.reshape(q.shape)  # --> [R, T, N, H]
        if width > 1:
            heads, source = probs.shape[1], probs.shape[-1]
            probs = probs.reshape(batch, heads, width, length, source).transpose(0, 2, 1, 3, 4)
            probs = probs.reshape(rows, heads, length, source)  # --> [R, N, T, S]
        return self.out(out), probs


def _attend_through_origin(
    q: Float[Array, "R 1 N H"],
    cache: KVCache,
    mask: Bool[Array, "..."],
    relative_keys: Float[Array, "1 S H"] | None,
    relative_values: Float[Array, "1 S H"] | None,
) -> Float[Array, "R 1 N H"]:
    """One query per row against slots read through ``cache.origin`` (see ``cache.py``).

    The cache holds ``[B, N, U, S, H]``: for each entry and head, the slots of its U = W beams side by
    side. Each of the W queries of an entry is scored against all ``U * S`` of them in one batched
    matrix product over (B, N) (W times the dot products of plain attention, which are few at one
    query per row), then each slot keeps the score of the beam its ``origin`` names; the values are
    mixed the same way. Nothing of the cache's size is gathered or copied. Equals
    ``dot_product_attention`` on the reordered cache up to float rounding.
    """
    rows, _, heads, head_dim = q.shape
    batch, _, width, length, _ = cache.k.shape
    q = q.reshape(batch, width, heads, head_dim) * jnp.asarray(head_dim**-0.5, q.dtype)
    q = jnp.swapaxes(q, 1, 2)  # [B, N, W, H]
    k = cache.k.reshape(batch, heads, width * length, head_dim)  # [B, N, U*S, H]
    v = cache.v.reshape(batch, heads, width * length, head_dim)  # [B, N, U*S, H]
    pick = jax.nn.one_hot(cache.origin.reshape(batch, width, length), width, dtype=jnp.float32)
    pick = jnp.swapaxes(pick, -1, -2)[:, None]  # [B, 1, W, U, S]: 1 where origin[b, w, s] == u
    every = jnp.einsum("BNWH,BNKH->BNWK", q, k, preferred_element_type=jnp.float32)
    every = every.reshape(batch, heads, width, width, length)  # [B, N, W, U, S]
    scores = jnp.sum(every * pick, axis=3)  # [B, N, W, S]
    if relative_keys is not None:
        scores += jnp.einsum(
            "BNWH,SH->BNWS", q, relative_keys[0], preferred_element_type=jnp.float32
        )
    mask = jnp.broadcast_to(mask, (1, 1, 1, length))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)  # [B, N, W, S] float32
    weights = (probs[:, :, :, None, :] * pick).astype(v.dtype)  # [B, N, W, U, S]
    weights = weights.reshape(batch, heads, width, width * length)  # [B, N, W, U*S]
    out = jnp.einsum("BNWK,BNKH->BNWH", weights, v)  # [B, N, W, H]
    if relative_values is not None:
        out += jnp.einsum("BNWS,SH->BNWH", probs.astype(v.dtype), relative_values[0])
    return jnp.swapaxes(out, 1, 2).reshape(rows, 1, heads, head_dim)  # --> [R, 1, N, H]
