"""An independent NumPy reference of the decoder-only LMs of Hugging Face checkpoints (GPT-2, Llama,
Mistral, Qwen2, Gemma), in float64 and written with loops: what ``DecoderOnlyLM`` must compute for
the options of ``TransformerConfig`` those families use. Formulas from the transformers sources
(``modeling_rope_utils.py``, ``masking_utils.py``, ``repeat_kv``, ``GemmaRMSNorm``), not from
jaxformer's code; used by ``test_lm_options.py``.
"""

import math

import jax
import numpy as np


def numpy_inverse_frequencies(head_dim, theta, scaling):
    """transformers' ``modeling_rope_utils`` formulas, one frequency at a time."""
    out = []
    for i in range(head_dim // 2):
        freq = theta ** (-2.0 * i / head_dim)
        if scaling is not None and scaling.rope_type == "linear":
            freq /= scaling.factor
        elif scaling is not None:  # llama3
            context = scaling.original_max_position_embeddings
            wavelength = 2 * math.pi / freq
            if wavelength > context / scaling.low_freq_factor:
                freq /= scaling.factor
            elif wavelength >= context / scaling.high_freq_factor:
                low, high = scaling.low_freq_factor, scaling.high_freq_factor
                smooth = (context / wavelength - low) / (high - low)
                freq = (1 - smooth) * freq / scaling.factor + smooth * freq
        out.append(freq)
    return np.array(out)


def numpy_rope(x, positions, freqs):
    """rotate_half RoPE of ``x [B, T, N, H]`` at ``positions [B, T]``: channels i and i + H/2 of
    every head turned as a plane by the angle ``position * freqs[i]``."""
    out = np.array(x, np.float64)
    half = x.shape[-1] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                angle = positions[b, t] * freqs[i]
                cos, sin = math.cos(angle), math.sin(angle)
                first, second = x[b, t, :, i], x[b, t, :, half + i]
                out[b, t, :, i] = first * cos - second * sin
                out[b, t, :, half + i] = second * cos + first * sin
    return out


def numpy_norm(c, p, x):
    eps = c.layer_norm_epsilon
    if c.norm == "layer":
        centred = x - x.mean(-1, keepdims=True)
        return (
            centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]
        )
    normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    return normed * (1.0 + p["scale"] if c.norm == "gemma_rms" else p["scale"])


def numpy_attention(c, p, x):
    """Self-attention of one row ``x [T, D]``: query head n reads key/value head n // (N / K)."""
    length, heads, kv_heads = x.shape[0], c.num_heads, c.kv_heads
    dense = lambda name, spec: np.einsum(spec, x, p[name]["kernel"]) + p[name].get("bias", 0.0)
    if "qkv" in p:
        qkv = dense("qkv", "td,dcnh->tcnh")
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    else:
        q, kv = dense("query", "td,dnh->tnh"), dense("kv", "td,dckh->tckh")
        k, v = kv[:, 0], kv[:, 1]
    if c.absolute_positions == "rotary":
        freqs = numpy_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        positions = np.arange(length)[None]
        q, k = numpy_rope(q[None], positions, freqs)[0], numpy_rope(k[None], positions, freqs)[0]
    out = np.zeros(q.shape)
    for n in range(heads):
        shared = n // (heads // kv_heads)
        for i in range(length):
            seen = [j for j in range(i + 1) if c.sliding_window is None or i - j < c.sliding_window]
            scores = k[seen, shared] @ q[i, n] / math.sqrt(c.head_dim)
            weights = np.exp(scores - scores.max())
            out[i, n] = weights / weights.sum() @ v[seen, shared]
    return np.einsum("tnh,nhd->td", out, p["out"]["kernel"]) + p["out"].get("bias", 0.0)


ACTIVATIONS = {
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + np.exp(-x)),
}


def numpy_ffn(c, p, x):
    dense = lambda name, h: h @ p[name]["kernel"] + p[name].get("bias", 0.0)
    act = ACTIVATIONS[{"swiglu": "silu"}.get(c.activation, c.activation).removeprefix("gated-")]
    h = act(dense("inner", x))
    if "inner_linear" in p:
        h = h * dense("inner_linear", x)
    return dense("outer", h)


def numpy_lm(c, params, ids):
    """A pre-norm decoder-only LM's logits ``[B, T, V]`` in float64, row by row."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    table = p["embedding"]["embedding"]
    scale = math.sqrt(c.d_model) if c.embedding_scale is None else c.embedding_scale
    out = []
    for row in np.asarray(ids):
        x = table[row] * scale
        if c.positions == "learned":
            x = x + p["positions"]["embedding"][np.arange(len(row)) + c.position_offset]
        for i in range(c.num_decoder_layers):
            layer = p["decoder"][f"layer_{i}"]
            x = x + numpy_attention(
                c, layer["self_attention"], numpy_norm(c, layer["norm_self"], x)
            )
            x = x + numpy_ffn(c, layer["ffn"], numpy_norm(c, layer["norm_ffn"], x))
        x = numpy_norm(c, p["decoder"]["final_norm"], x)
        tied = c.share_output_embeddings
        out.append(x @ table.T if tied else x @ p["output"]["kernel"] + p["output"].get("bias", 0))
    return np.stack(out)
