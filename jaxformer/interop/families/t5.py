"""T5, T5 v1.1 and mT5 (``model_type`` ``t5``, ``mt5``; MADLAD-400 is a ``t5``).

RMS norms, no biases, no query scaling, a bucketed relative attention bias in the first layer of
each stack (shared by its layers), ``d_kv`` heads, relu or gated GELU, a tied output scaled by
``d_model**-0.5`` (v1.0) or an untied ``lm_head`` (v1.1, mT5). Tensor names
``{encoder,decoder}.block.{i}.layer.{j}.*``, torch ``Linear`` weights ``[out, in]``.
"""

from __future__ import annotations

from jaxformer.interop.weights import Table, Tensors, attention, ffn, linear, norm, same, tied
from jaxformer.models.config import TransformerConfig
from jaxformer.models.encoder_decoder import Transformer

MODEL = Transformer


def config(cfg, max_len: int | None) -> TransformerConfig:
    projection = cfg.get("feed_forward_proj", "relu")
    gated = projection.startswith("gated-")
    base = projection.removeprefix("gated-")
    if gated and base == "gelu":
        base = "gelu_new"  # transformers' rule for "gated-gelu" (T5 v1.1, mT5)
    activation = cfg.activation(base, "feed_forward_proj")
    tied_output = cfg.get("tie_word_embeddings", True)
    # transformers 5 saves ``scale_decoder_outputs`` (the d_model**-0.5 before a tied output);
    # older configs imply it by ``tie_word_embeddings``.
    scale = cfg.get("scale_decoder_outputs", tied_output)
    if scale and not tied_output:
        cfg.refuse("scale_decoder_outputs", "a scaled output without tie_word_embeddings")
    rate = float(cfg.get("dropout_rate", 0.0))
    return TransformerConfig(
        vocab_size=cfg.need("vocab_size"),
        d_model=cfg.need("d_model"),
        num_heads=cfg.need("num_heads"),
        num_encoder_layers=cfg.need("num_layers"),
        num_decoder_layers=cfg.get("num_decoder_layers") or cfg.need("num_layers"),
        ffn_dim=cfg.need("d_ff"),
        dropout=rate,
        attention_dropout=rate,
        ffn_dropout=rate,
        max_len=max_len or 1024,  # relative positions: no table bounds it; a hint may raise it
        share_embeddings=True,
        share_output_embeddings=tied_output,
        pad_id=cfg.get("pad_token_id", 0),
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
        norm="rms",
        pre_norm=True,
        activation=("gated-" if gated else "") + activation,
        positions="none",
        embedding_scale=1.0,
        output_bias=False,
        tied_output_scale=bool(scale),
        attention_head_dim=cfg.need("d_kv"),
        query_scaling=False,
        attention_bias=False,
        ffn_bias=False,
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
    )


def table(c: TransformerConfig, t: Tensors) -> Table:
    embeddings = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    if c.share_output_embeddings:
        out: Table = {"target_embedding/embedding": tied(*embeddings, "lm_head.weight")}
    else:
        out = {
            "target_embedding/embedding": tied(*embeddings),
            "output/kernel": linear("lm_head.weight"),
        }
    for stack in ("encoder", "decoder"):
        decoder = stack == "decoder"
        for i in range(c.num_decoder_layers if decoder else c.num_encoder_layers):
            out |= _layer(c, f"{stack}/layer_{i}", f"{stack}.block.{i}.layer", decoder)
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[f"{stack}/relative_attention_bias"] = same(bias)
        out |= norm(f"{stack}/final_norm", f"{stack}.final_layer_norm.weight")
    return out


def _attention(c, ours: str, theirs: str, fused: bool) -> Table:
    q, k, v, o = (f"{theirs}.{x}.weight" for x in "qkvo")
    return attention(c, ours, q, k, v, o, fused=fused)


def _layer(c, ours: str, theirs: str, decoder: bool) -> Table:
    """``theirs.0``: self-attention; decoder ``theirs.1``: cross-attention; then the FFN (gated:
    ``wi_0`` activated, times ``wi_1``)."""
    j = 2 if decoder else 1
    mlp = f"{theirs}.{j}.DenseReluDense"
    if c.activation.startswith("gated-"):
        ffn_table = ffn(c, f"{ours}/ffn", f"{mlp}.wi_0", f"{mlp}.wo", f"{mlp}.wi_1")
    else:
        ffn_table = ffn(c, f"{ours}/ffn", f"{mlp}.wi", f"{mlp}.wo")
    first_norm = f"{ours}/norm_{'self' if decoder else 'attention'}"
    out = {
        **_attention(c, f"{ours}/self_attention", f"{theirs}.0.SelfAttention", True),
        **norm(first_norm, f"{theirs}.0.layer_norm.weight"),
        **ffn_table,
        **norm(f"{ours}/norm_ffn", f"{theirs}.{j}.layer_norm.weight"),
    }
    if decoder:
        out |= _attention(c, f"{ours}/memory_attention", f"{theirs}.1.EncDecAttention", False)
        out |= norm(f"{ours}/norm_memory", f"{theirs}.1.layer_norm.weight")
    return out
