"""Multi-head attention: full passes (training, prefill), one cached step, cross-attention to a memory.

The arithmetic is in ``dot_product.py``; the caches (``cache.py``) decide how a cached step reads its
keys and values. A ``KVCache`` keeps them heads-major, ``[B, K, S, H]``: the one-token attention of a
decode step is then a batched matrix product over (B, K) that reads the cache where it lies. (In the
``[B, S, N, H]`` layout that the projections produce, XLA:CPU copied every layer's cache and the memory
keys and values into that order at every step: half the time of a ``small`` batch-64 step.)

With ``maximum_relative_position > 0`` (self-attention only) the relative key/value tables of Shaw et al.
(2018) add ``q . rel_k[clip(j - i)]`` to the scores and ``sum_j p_ij rel_v[clip(j - i)]`` to the output,
with query and key positions measured absolutely (cache slot j holds position j).

Options of other implementations: ``head_dim`` H other than ``d_model / num_heads`` (T5's ``d_kv``:
the projections then map D to an inner width N*H and back), ``use_bias=False`` (T5 has no biases;
``out_bias`` overrides it for the output projection: Qwen2 has biases on q, k, v only), and
``query_scaling=False`` (T5 folds the 1/sqrt(H) into its initialisation and scores with plain q . k).
The arithmetic in ``dot_product.py`` always divides by sqrt(H); without query scaling the queries are
first multiplied by sqrt(H), in every path alike, so a cached step scores exactly as the full pass.
(This is exact when sqrt(H) is a power of two, e.g. T5's H = 64, and within one rounding otherwise.)

Options of decoder-only checkpoints (``TransformerConfig``'s docstring names the families):

- ``num_kv_heads`` K < N: grouped-query attention. The projections are then ``query [D, N, H]`` and
  ``kv [D, 2, K, H]`` instead of the fused ``qkv [D, 3, N, H]`` (kept whenever K == N, so that
  existing parameters load unchanged); caches hold K heads; ``dot_product.py`` groups the queries.
- ``rotary``: self-attention queries and keys rotated by their absolute positions (``rotary.py``)
  after the projections, in the full pass (positions 0..T-1), the prefill, and a cached step (at
  ``step``, per row when ``step`` is ``int32[R]``). The cache keeps the rotated keys.
- ``sliding_window``: a cached step reads only the slots of the last W positions. Full passes get
  the window in the mask their caller builds (``masks.causal_mask``).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.models.cache import BeamKVCache, KVCache
from jaxformer.models.dot_product import attend_heads_major, dot_product_attention
from jaxformer.models.positions import relative_positions
from jaxformer.models.quantization import dense_options
from jaxformer.models.rotary import Rotary
from jaxformer.typing import Array, Bool, Float, Int


class MultiHeadAttention(nn.Module):
    """Multi-head attention with fused projections (QKV for self-attention, KV for cross-attention;
    with fewer key/value heads than query heads, self-attention has ``query`` and ``kv`` too).

    Methods: ``__call__`` for a full pass, ``project_kv`` for the cross-attention memory (computed once
    per source), ``attend_cached`` for a one-token query against caller-held keys and values.
    """

    num_heads: int
    d_model: int
    self_attention: bool = True
    dropout: float = 0.0
    maximum_relative_position: int = 0
    dtype: Any = jnp.float32
    head_dim: int | None = None  # H; None: d_model // num_heads
    query_scaling: bool = True  # False: no 1/sqrt(H) on the scores (T5)
    use_bias: bool = True
    quantization: str | None = None  # the projections' products; "int8": see quantization.py
    num_kv_heads: int | None = None  # K; None: num_heads
    out_bias: bool | None = None  # a bias on the output projection; None: use_bias
    rotary: Rotary | None = None  # self-attention only
    sliding_window: int | None = None  # cached steps read the last W positions only

    def setup(self):
        n, k = self.num_heads, self.kv_heads
        h = self.d_model // n if self.head_dim is None else self.head_dim
        options = dense_options(self.quantization)
        dense = lambda features, axis, name, bias=self.use_bias: nn.DenseGeneral(
            features, axis=axis, use_bias=bias, dtype=self.dtype, name=name, **options
        )
        if self.fused:
            self.qkv = dense((3, n, h), -1, "qkv")
        else:
            self.query = dense((n, h), -1, "query")
            self.kv = dense((2, k, h), -1, "kv")
        out_bias = self.use_bias if self.out_bias is None else self.out_bias
        self.out = dense(self.d_model, (-2, -1), "out", out_bias)
        if self.rotary is not None and not self.self_attention:
            raise ValueError("rotary positions apply to self-attention only")
        self.attention_dropout = nn.Dropout(self.dropout)
        if self.maximum_relative_position > 0:
            if not self.self_attention:
                raise ValueError("relative positions apply to self-attention only")
            init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
            rows = 2 * self.maximum_relative_position + 1
            self.relative_keys = self.param("relative_keys", init, (rows, h))
            self.relative_values = self.param("relative_values", init, (rows, h))

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def fused(self) -> bool:
        """One ``qkv`` projection: self-attention with as many key/value heads as query heads."""
        return self.self_attention and self.kv_heads == self.num_heads

    def _self_projections(self, x: Float[Array, "B T D"], positions):
        """Queries ``[B, T, N, H]`` (unscaled as the dot product wants them), keys and values
        ``[B, T, K, H]``; queries and keys rotated at ``positions`` (``[T]`` or ``[B, T]``) with
        rotary positions."""
        if self.fused:
            qkv = self.qkv(x)  # [B, T, 3, N, H]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = self.query(x)  # [B, T, N, H]
            k, v = self.project_kv(x)  # [B, T, K, H]
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return self._unscaled(q), k, v

    def _unscaled(self, q: Float[Array, "B T N H"]) -> Float[Array, "B T N H"]:
        """Queries as the dot product should see them: times sqrt(H) when scores are not scaled."""
        if self.query_scaling:
            return q
        return q * jnp.asarray(q.shape[-1] ** 0.5, q.dtype)

    def _relative(self, query_pos: Int[Array, " T"], key_pos: Int[Array, " S"]):
        if self.maximum_relative_position == 0:
            return None, None
        idx = relative_positions(query_pos, key_pos, self.maximum_relative_position)  # [T, S]
        return (
            self.relative_keys[idx].astype(self.dtype),  # [T, S, H]
            self.relative_values[idx].astype(self.dtype),
        )

    def project_kv(self, memory: Float[Array, "B S D"]) -> tuple[Array, Array]:
        """Keys and values ``[B, S, K, H]`` of the cross-attention memory (or of self-attention's
        input, with K < N)."""
        kv = self.kv(memory)  # [B, S, 2, K, H]
        return kv[:, :, 0], kv[:, :, 1]

    def __call__(
        self,
        x: Float[Array, "B T D"],
        memory: Float[Array, "B S D"] | None = None,
        mask: Bool[Array, "..."] | None = None,
        deterministic: bool = True,
        bias: Float[Array, "_ N T S"] | None = None,
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B N T S"]]:
        """Full pass. Self-attention when ``memory`` is None, else cross-attention to ``memory``.

        ``bias``: an additive per-head score bias (T5's relative bias, ``t5_buckets.py``)."""
        if self.self_attention:
            pos = jnp.arange(x.shape[1])
            q, k, v = self._self_projections(x, pos)  # [B, T, N, H], [B, T, K, H] x2
            rel_k, rel_v = self._relative(pos, pos)
        else:
            q = self._unscaled(self.query(x))  # [B, T, N, H]
            k, v = self.project_kv(memory)  # [B, S, K, H]
            rel_k = rel_v = None
        out, probs = self._attend(q, k, v, mask, rel_k, rel_v, deterministic, bias)
        return self.out(out), probs

    def _attend(self, q, k, v, mask, rel_k, rel_v, deterministic, bias=None):
        dropout = None
        if not deterministic and self.dropout > 0.0:
            dropout = lambda p: self.attention_dropout(p, deterministic=False)
        return dot_product_attention(q, k, v, mask, rel_k, rel_v, dropout, bias)

    def self_attend_cached(
        self,
        x: Float[Array, "R 1 D"],
        cache: KVCache | BeamKVCache,
        step,
        bias: Float[Array, "_ N 1 S"] | None = None,
    ) -> tuple[Float[Array, "R 1 D"], KVCache | BeamKVCache]:
        """One token per row at absolute position ``step`` (a scalar, or ``int32[R]``: one per row):
        write its K/V into slot ``step``, attend to slots 0..step (``bias``: ``[1 or R, N, 1, S]``;
        with a sliding window W, slots step-W+1..step)."""
        query = jnp.reshape(step, (-1,))  # [1] or [R]
        positions = query if jnp.ndim(step) == 0 else query[:, None]  # [1] or [R, 1]
        q, k, v = self._self_projections(x, positions)  # the projections see one token
        relative = self._relative(query, jnp.arange(cache.length))  # [1 or R, S, H] each
        out = cache.attend(q, step, relative, bias, new=(k, v), window=self.sliding_window)
        return self.out(out), cache.write(k, v, step)  # read before the write

    def self_attend_prefill(
        self,
        x: Float[Array, "B T D"],
        cache: KVCache,
        mask: Bool[Array, "..."],
        bias: Float[Array, "_ N T T"] | None = None,
    ) -> tuple[Float[Array, "B T D"], KVCache]:
        """A prompt of T tokens at positions 0..T-1: causal attention, and its K/V written to the cache."""
        pos = jnp.arange(x.shape[1])
        q, k, v = self._self_projections(x, pos)  # [B, T, N, H], [B, T, K, H] x2
        rel_k, rel_v = self._relative(pos, pos)
        out, _ = dot_product_attention(q, k, v, mask, rel_k, rel_v, bias=bias)
        return self.out(out), cache.write(k, v, 0)

    def cross_attend_cached(
        self,
        x: Float[Array, "R T D"],
        memory_k: Float[Array, "B K S H"],
        memory_v: Float[Array, "B K S H"],
        memory_mask: Bool[Array, "B S"],
    ) -> tuple[Float[Array, "R T D"], Float[Array, "R N T S"]]:
        """Cross-attention against memory keys/values computed once (``project_kv``, heads-major).

        ``x`` may have W rows per memory entry (``R = B*W`` search rows laid out ``[b0w0, b0w1, ...,
        b1w0, ...]``): the W queries of an entry then attend to its one copy of the memory, so the
        memory never has to be tiled to ``R`` rows nor reordered with the beams.
        """
        q = self._unscaled(self.query(x))  # [R, T, N, H]
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
