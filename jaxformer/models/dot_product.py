"""Softmax attention on projected heads: the arithmetic shared by full passes and cached steps.

Scores are ``q . k / sqrt(H)`` computed and soft-maxed in float32. A masked score gets the most
negative finite value and its probability is then set to exactly 0, so a fully masked row gives an
all-zero attention vector and a zero output, never NaN.

Relative position terms (Shaw et al. 2018) come as tables already indexed by (query, key) position:
``[T, S, H]`` when every row of the batch has the same query positions, ``[B, T, S, H]`` when each row
has its own (ragged prompts decode at per-row positions).

An additive ``bias`` on the scores (T5's bucketed relative bias, ``t5_buckets.py``) comes per head:
``[1 or B, N, T, S]``, or ``[R, N, 1, S]`` for one query per search row.

Grouped-query attention (Ainslie et al. 2023; multi-query, Shazeer 2019): keys and values may have
K heads for the N heads of the queries (K divides N). Query head n reads key/value head ``n // G``,
``G = N / K`` (transformers' ``repeat_kv`` order). The keys and values are never repeated to N
heads: the queries of a group are stacked as G times as many queries of one head, so that each
product stays one batched matrix product over (B, K) on the keys and values where they lie. With
K == N every path computes the same products as before GQA existed.

Three layouts of keys and values:

- ``dot_product_attention``: the projections' ``[B, S, K, H]`` (full passes, prefill);
- ``attend_heads_major``: a ``KVCache``'s ``[B, K, S, H]``, read in place by a cached step;
- ``attend_through_origin``: a ``BeamKVCache``'s ``[B, K, W, S, H]`` read through its origin table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.typing import Array, Bool, Float, Int


def _relative_scores(q, relative_keys):
    if relative_keys.ndim == 3:  # [T, S, H]: the same positions for every row
        return jnp.einsum("BTNH,TSH->BNTS", q, relative_keys, preferred_element_type=jnp.float32)
    return jnp.einsum("BTNH,BTSH->BNTS", q, relative_keys, preferred_element_type=jnp.float32)


def _relative_values(weights, relative_values):
    if relative_values.ndim == 3:
        return jnp.einsum("BNTS,TSH->BTNH", weights, relative_values)
    return jnp.einsum("BNTS,BTSH->BTNH", weights, relative_values)


def _scores(q: Float[Array, "B N T H"], k: Float[Array, "B K S H"]) -> Float[Array, "B N T S"]:
    """``q . k`` in float32, both heads-major: a decode step's scores against a cache.

    With the queries in the projections' ``[B, T, N, H]`` order instead (as ``attend_heads_major``
    has them, for full passes), XLA:CPU transposed every layer's keys to meet them at every decode
    step (an ``[N, H, S]`` copy of the whole cache). The G query heads of a key/value head are
    stacked along T (a reshape, nothing moved).
    """
    b, n, t, h = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, kv_heads, n // kv_heads * t, h)  # [B, K, G*T, H]
    scores = jnp.einsum("BKMH,BKSH->BKMS", grouped, k, preferred_element_type=jnp.float32)
    return scores.reshape(b, n, t, k.shape[2])  # [B, K, G*T, S] --> [B, N, T, S]


def _full_scores(q: Float[Array, "B T N H"], k: Float[Array, "B K S H"]) -> Float[Array, "B N T S"]:
    """``q . k`` in float32 for queries in the projections' order (full passes)."""
    if q.shape[2] == k.shape[1]:
        return jnp.einsum("BTNH,BNSH->BNTS", q, k, preferred_element_type=jnp.float32)
    return _scores(jnp.swapaxes(q, 1, 2), k)


def _mix_heads_major(
    weights: Float[Array, "B N T S"], v: Float[Array, "B K S H"]
) -> Float[Array, "B N T H"]:
    """``sum_j weights[.., j] v_j``: each query head mixes the values of its key/value head."""
    b, n, t, s = weights.shape
    kv_heads = v.shape[1]
    grouped = weights.reshape(b, kv_heads, n // kv_heads * t, s)  # [B, K, G*T, S]
    return jnp.einsum("BKMS,BKSH->BKMH", grouped, v).reshape(b, n, t, v.shape[3])


def _mix(weights: Float[Array, "B N T S"], v: Float[Array, "B K S H"]) -> Float[Array, "B T N H"]:
    """``_mix_heads_major`` with the output in the projections' ``[B, T, N, H]`` order."""
    if weights.shape[1] == v.shape[1]:
        return jnp.einsum("BNTS,BNSH->BTNH", weights, v)
    return jnp.swapaxes(_mix_heads_major(weights, v), 1, 2)


def _repeat_heads(x: Float[Array, "B T K H"], heads: int) -> Float[Array, "B T N H"]:
    """One token's key or value of K heads as N: each repeated for the G query heads it serves
    (a step's own new key and value only, never a cache)."""
    return x if x.shape[2] == heads else jnp.repeat(x, heads // x.shape[2], axis=2)


def dot_product_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: Bool[Array, ...] | None,
    relative_keys: Float[Array, ...] | None = None,
    relative_values: Float[Array, ...] | None = None,
    dropout=None,
    bias: Float[Array, "_ N T S"] | None = None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B N T S"]]:
    """Softmax attention of already-projected heads; returns the output and the probabilities.

    ``dropout`` (training only) maps the probabilities to the weights actually applied to the values;
    the returned probabilities are the undropped ones.
    """
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, S, K, H] --> [B, K, S, H]
    return attend_heads_major(
        q, heads_major(k), heads_major(v), mask, relative_keys, relative_values, dropout, bias
    )


def attend_heads_major(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B K S H"],
    v: Float[Array, "B K S H"],
    mask: Bool[Array, ...] | None,
    relative_keys: Float[Array, ...] | None = None,
    relative_values: Float[Array, ...] | None = None,
    dropout=None,
    bias: Float[Array, "_ N T S"] | None = None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B N T S"]]:
    """``dot_product_attention`` with keys and values in the cache's ``[B, K, S, H]`` layout."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = _full_scores(q, k)  # [B, N, T, S]
    if relative_keys is not None:
        scores += _relative_scores(q, relative_keys)
    if bias is not None:
        scores += bias.astype(jnp.float32)  # [1 or B, N, T, S]
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, N, T, S] float32
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)  # fully masked rows -> zeros, not a uniform spread
    weights = (probs if dropout is None else dropout(probs)).astype(v.dtype)
    out = _mix(weights, v)  # [B, T, N, H]
    if relative_values is not None:
        out += _relative_values(weights, relative_values)
    return out, probs


def attend_step(
    q: Float[Array, "B 1 N H"],
    k: Float[Array, "B K S H"],
    v: Float[Array, "B K S H"],
    k_new: Float[Array, "B 1 K H"],
    v_new: Float[Array, "B 1 K H"],
    at: Bool[Array, "_B S"],
    mask: Bool[Array, ...],
    relative_keys: Float[Array, ...] | None = None,
    relative_values: Float[Array, ...] | None = None,
    bias: Float[Array, "_ N 1 S"] | None = None,
) -> Float[Array, "B 1 N H"]:
    """One query per row against a cache's slots and the row's own new key and value.

    ``attend_heads_major`` on the cache with ``k_new`` / ``v_new`` written at slot ``at`` (one-hot
    over S, per row or for all), computed without that write: slot ``at``'s score and value come
    from ``k_new`` / ``v_new`` and the cache's content there is ignored. The caller writes the cache
    *after* the step reads it. Written the other way round (write, then read the written cache),
    XLA:CPU copied every layer's whole preallocated cache several times a step, so that a one-token
    step cost in proportion to the cache length; read first, and compiled with region-based copy
    insertion (``jaxformer.decoding.CPU_COMPILER_OPTIONS``, which ``generate`` uses), the write
    stays in place. The same arithmetic as writing first, up to the order of one sum.
    """
    heads = q.shape[2]
    k_new = _repeat_heads(k_new.astype(k.dtype), heads)  # [B, 1, N, H]
    v_new = _repeat_heads(v_new.astype(v.dtype), heads)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = _scores(jnp.swapaxes(q, 1, 2), k)  # [B, N, 1, S]
    own = jnp.einsum("BTNH,BTNH->BNT", q, k_new, preferred_element_type=jnp.float32)  # [B, N, 1]
    at = at[:, None, None, :]  # [1 or B, 1, 1, S]
    scores = jnp.where(at, own[..., None], scores)
    if relative_keys is not None:
        scores += _relative_scores(q, relative_keys)
    if bias is not None:
        scores += bias.astype(jnp.float32)  # [1 or B, N, 1, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)  # [B, N, 1, S] float32
    weights = probs.astype(v.dtype)
    zero = jnp.zeros((), weights.dtype)
    out = _mix(jnp.where(at, zero, weights), v)  # [B, 1, N, H]; slot at: from v_new
    own_weight = jnp.sum(jnp.where(at, weights, zero), axis=-1)  # [B, N, 1]
    out += jnp.swapaxes(own_weight, 1, 2)[..., None] * v_new  # [B, 1, N, H]
    if relative_values is not None:
        out += _relative_values(weights, relative_values)
    return out


def attend_through_origin(
    q: Float[Array, "R 1 N H"],
    k: Float[Array, "B K W S H"],
    v: Float[Array, "B K W S H"],
    origin: Int[Array, "R S"],
    mask: Bool[Array, "R S"],
    relative_keys: Float[Array, "R S H"] | None,
    relative_values: Float[Array, "R S H"] | None,
    bias: Float[Array, "R N 1 S"] | None = None,
    new: tuple[Array, Array, Array] | None = None,
) -> Float[Array, "R 1 N H"]:
    """One query per search row against slots read through ``origin`` (see ``cache.BeamKVCache``).

    ``new``: ``(k_new [R, 1, K, H], v_new, at [1 or R, S])``, the row's own key and value for the
    slot ``at`` that the cache is written at after this read (as in ``attend_step``).

    For each entry and head the cache holds the slots of its U = W beams side by side. Each of the W
    queries of an entry is scored against all ``U * S`` of them in one batched matrix product over
    (B, K) (W times the dot products of plain attention, which are few at one query per row), then each
    slot keeps the score of the beam its ``origin`` names; the values are mixed the same way. Nothing
    of the cache's size is gathered or copied. Equals ``attend_heads_major`` on the reordered cache up
    to float rounding.
    """
    rows, _, heads, head_dim = q.shape
    batch, kv_heads, width, length, _ = k.shape
    q = q.reshape(batch, width, heads, head_dim) * jnp.asarray(head_dim**-0.5, q.dtype)
    q = jnp.swapaxes(q, 1, 2)  # [B, N, W, H]
    k = k.reshape(batch, kv_heads, width * length, head_dim)  # [B, K, U*S, H]
    v = v.reshape(batch, kv_heads, width * length, head_dim)  # [B, K, U*S, H]
    pick = jax.nn.one_hot(origin.reshape(batch, width, length), width, dtype=jnp.float32)
    pick = jnp.swapaxes(pick, -1, -2)[:, None]  # [B, 1, W, U, S]: 1 where origin[b, w, s] == u
    every = _scores(q, k)  # [B, N, W, U*S]
    every = every.reshape(batch, heads, width, width, length)  # [B, N, W, U, S]
    scores = jnp.sum(every * pick, axis=3)  # [B, N, W, S]
    per_entry = lambda x: x.reshape(batch, width, *x.shape[1:])  # [R, ...] --> [B, W, ...]
    if new is not None:
        k_new, v_new, at = (_repeat_heads(new[0], heads), _repeat_heads(new[1], heads), new[2])
        k_new = jnp.swapaxes(per_entry(k_new[:, 0].astype(k.dtype)), 1, 2)  # [B, N, W, H]
        v_new = jnp.swapaxes(per_entry(v_new[:, 0].astype(v.dtype)), 1, 2)  # [B, N, W, H]
        own = jnp.einsum("BNWH,BNWH->BNW", q, k_new, preferred_element_type=jnp.float32)
        at = jnp.broadcast_to(at, (rows, length)).reshape(batch, 1, width, length)  # [B, 1, W, S]
        scores = jnp.where(at, own[..., None], scores)
    if relative_keys is not None:
        scores += jnp.einsum(
            "BNWH,BWSH->BNWS", q, per_entry(relative_keys), preferred_element_type=jnp.float32
        )
    if bias is not None:
        scores += jnp.swapaxes(per_entry(bias[:, :, 0]), 1, 2).astype(jnp.float32)  # [B, N, W, S]
    mask = per_entry(mask)[:, None]  # [B, 1, W, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)  # [B, N, W, S] float32
    mixed = probs if new is None else jnp.where(at, 0.0, probs)  # the new slot: from v_new
    weights = (mixed[:, :, :, None, :] * pick).astype(v.dtype)  # [B, N, W, U, S]
    weights = weights.reshape(batch, heads, width, width * length)  # [B, N, W, U*S]
    out = _mix_heads_major(weights, v)  # [B, N, W, H]
    if new is not None:
        own_weight = jnp.sum(jnp.where(at, probs, 0.0), axis=-1)  # [B, N, W]
        out += own_weight[..., None].astype(v.dtype) * v_new
    if relative_values is not None:
        out += jnp.einsum("BNWS,BWSH->BNWH", probs.astype(v.dtype), per_entry(relative_values))
    return jnp.swapaxes(out, 1, 2).reshape(rows, 1, heads, head_dim)  # --> [R, 1, N, H]
