"""A float64 NumPy reference of the encoder-decoder Transformers imported from Hugging Face (Marian,
M2M100 / NLLB, BART / mBART, T5 / mT5): the teacher-forced logits a config and a parameter tree
describe, computed in float64 from the (float32) weights.

The Hugging Face fixtures of these families (``tests/data/hf``) recorded transformers' float32
logits only, so this stands in for the float64 reference the decoder-only fixtures have: with it,
``experiments/parity.py`` and ``tests/interop/test_huggingface_models.py`` compare both float32
implementations (jaxformer's and transformers') with the same exact-arithmetic function. Written
from the transformers sources (``modeling_bart.py``, ``modeling_marian.py``, ``modeling_t5.py``),
not from jaxformer's code; it shares two tables with jaxformer: the sinusoids (float32 tables,
as in both frameworks) and nothing else (T5's buckets are computed here).
"""

import math

import jax
import numpy as np

from jaxformer.models.positions import sinusoidal_table


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": _gelu,
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + np.exp(-x)),
}


def _norm(c, p, x):
    if c.norm == "rms":  # T5LayerNorm: no mean, no bias
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + c.layer_norm_epsilon) * p["scale"]
    centred = x - x.mean(-1, keepdims=True)
    variance = (centred**2).mean(-1, keepdims=True)
    return centred / np.sqrt(variance + c.layer_norm_epsilon) * p["scale"] + p["bias"]


def t5_buckets(relative, bidirectional: bool, num_buckets: int, max_distance: int):
    """transformers' ``T5Attention._relative_position_bucket`` (``relative = key - query``)."""
    buckets = np.zeros(relative.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    exact = num_buckets // 2
    small = relative < exact
    scaled = np.log(np.maximum(relative, 1) / exact) / math.log(max_distance / exact)
    large = exact + (scaled * (num_buckets - exact)).astype(np.int64)  # used where not small
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(small, relative, large)


def _attention(c, p, x, memory, mask, bias):
    """Multi-head attention of ``x [B, T, D]`` over ``memory [B, S, D]`` (``mask [B, T, S]``)."""
    if "qkv" in p:
        qkv = np.einsum("btd,dcnh->btcnh", x, p["qkv"]["kernel"]) + p["qkv"].get("bias", 0.0)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"]) + p["query"].get("bias", 0.0)
        kv = np.einsum("bsd,dcnh->bscnh", memory, p["kv"]["kernel"]) + p["kv"].get("bias", 0.0)
        k, v = kv[:, :, 0], kv[:, :, 1]
    scores = np.einsum("btnh,bsnh->bnts", q, k)
    if c.query_scaling:
        scores = scores / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias  # [1, N, T, S]
    scores = np.where(mask[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", weights, v)
    return np.einsum("btnh,nhd->btd", out, p["out"]["kernel"]) + p["out"].get("bias", 0.0)


def _ffn(c, p, x):
    gated = c.activation.startswith("gated-")
    act = ACTIVATIONS[c.activation.removeprefix("gated-")]
    h = act(x @ p["inner"]["kernel"] + p["inner"].get("bias", 0.0))
    if gated:
        h = h * (x @ p["inner_linear"]["kernel"] + p["inner_linear"].get("bias", 0.0))
    return h @ p["outer"]["kernel"] + p["outer"].get("bias", 0.0)


def _embed(c, p, ids, side: str):
    """Tokens of ``side`` ("source" / "target"): its table (the target's when shared), positions
    and embedding norm (one per side, never shared)."""
    table = p.get(f"{side}_embedding", p["target_embedding"])["embedding"]
    scale = math.sqrt(c.d_model) if c.embedding_scale is None else c.embedding_scale
    x = table[ids] * scale
    positions = np.arange(ids.shape[1]) + c.position_offset
    if c.absolute_positions == "sinusoidal":
        sinusoids = sinusoidal_table(
            int(positions[-1]) + 1, c.d_model, c.position_layout, c.position_rate_denominator
        )
        x = x + sinusoids[positions].astype(np.float64)
    elif c.absolute_positions == "learned":
        x = x + p[f"{side}_positions"]["embedding"][positions]
    if c.embedding_norm:
        x = _norm(c, p[f"{side}_embedding_norm"], x)
    return x


def _sublayer(c, norm, x, compute):
    """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``."""
    return x + compute(_norm(c, norm, x)) if c.pre_norm else _norm(c, norm, x + compute(x))


def _t5_bias(c, stack, length_q, length_k, bidirectional):
    if not c.relative_attention_num_buckets:
        return None
    relative = np.arange(length_k)[None] - np.arange(length_q)[:, None]
    buckets = t5_buckets(
        relative, bidirectional, c.relative_attention_num_buckets, c.relative_attention_max_distance
    )
    return stack["relative_attention_bias"][buckets].transpose(2, 0, 1)[None]  # [1, N, T, S]


def numpy_seq2seq(c, params, src_ids, tgt_in_ids):
    """Teacher-forced logits ``[B, T, V]`` in float64 of ``Transformer(c)`` with ``params``."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    src, tgt = np.asarray(src_ids), np.asarray(tgt_in_ids)
    valid = src != c.pad_id  # [B, S]
    x = _embed(c, p, src, "source")
    encoder, decoder = p["encoder"], p["decoder"]
    mask = np.broadcast_to(valid[:, None, :], (len(src), src.shape[1], src.shape[1]))
    bias = _t5_bias(c, encoder, src.shape[1], src.shape[1], True)
    for i in range(c.num_encoder_layers):
        layer = encoder[f"layer_{i}"]
        x = _sublayer(
            c, layer["norm_attention"], x,
            lambda h, layer=layer: _attention(c, layer["self_attention"], h, h, mask, bias),
        )  # fmt: skip
        x = _sublayer(c, layer["norm_ffn"], x, lambda h, layer=layer: _ffn(c, layer["ffn"], h))
    if c.has_final_norm:
        x = _norm(c, encoder["final_norm"], x)
    memory = x
    y = _embed(c, p, tgt, "target")
    length = tgt.shape[1]
    causal = np.broadcast_to(np.tri(length, dtype=bool)[None], (len(tgt), length, length))
    cross = np.broadcast_to(valid[:, None, :], (len(tgt), length, src.shape[1]))
    self_bias = _t5_bias(c, decoder, length, length, False)
    for i in range(c.num_decoder_layers):
        layer = decoder[f"layer_{i}"]
        y = _sublayer(
            c, layer["norm_self"], y,
            lambda h, layer=layer: _attention(c, layer["self_attention"], h, h, causal, self_bias),
        )  # fmt: skip
        y = _sublayer(
            c, layer["norm_memory"], y,
            lambda h, layer=layer: _attention(c, layer["memory_attention"], h, memory, cross, None),
        )  # fmt: skip
        y = _sublayer(c, layer["norm_ffn"], y, lambda h, layer=layer: _ffn(c, layer["ffn"], h))
    if c.has_final_norm:
        y = _norm(c, decoder["final_norm"], y)
    if c.share_output_embeddings:
        if c.tied_output_scale:
            y = y * c.d_model**-0.5
        logits = y @ p["target_embedding"]["embedding"].T + p.get("output_bias", 0.0)
    else:
        logits = y @ p["output"]["kernel"] + p["output"].get("bias", 0.0)
    if c.final_logits_bias:
        logits = logits + p["final_logits_bias"]
    return logits
