"""BART and mBART (``model_type`` ``bart``, ``mbart``), and the tensor names of ``BartModel`` that
Marian and M2M100 / NLLB share (``marian.py``, ``m2m100.py`` give their configs).

Learned positions with an offset of 2, ``layernorm_embedding``, post-norm (BART) or pre-norm with
final norms (mBART), ``final_logits_bias``. Tensor names ``model.{encoder,decoder}.layers.{i}.*``
(``model.`` left out in some files), torch ``Linear`` weights ``[out, in]``.
"""

from __future__ import annotations

import numpy as np

from jaxformer.interop.weights import (
    Table,
    Tensors,
    attention,
    dense,
    leading_rows,
    linear,
    norm,
    reshaped,
    tied,
)
from jaxformer.models.config import TransformerConfig
from jaxformer.models.encoder_decoder import Transformer

MODEL = Transformer


def config(cfg, max_len: int | None, **positions) -> TransformerConfig:
    """A BART-shaped config.json; ``positions``: the family's kind (pre-norm, positions)."""
    d_model, vocab = cfg.need("d_model"), cfg.need("vocab_size")
    shared = cfg.model_type != "marian" or cfg.get("share_encoder_decoder_embeddings", True)
    target_vocab = vocab if shared else cfg.get("decoder_vocab_size", vocab)
    if not positions:
        mbart = cfg.model_type == "mbart"
        positions = dict(
            pre_norm=mbart, positions="learned", position_offset=2, embedding_norm=True
        )
    return TransformerConfig(
        vocab_size=target_vocab,
        src_vocab_size=None if target_vocab == vocab else vocab,
        d_model=d_model,
        num_heads=cfg.same("encoder_attention_heads", "decoder_attention_heads"),
        num_encoder_layers=cfg.need("encoder_layers"),
        num_decoder_layers=cfg.need("decoder_layers"),
        ffn_dim=cfg.same("encoder_ffn_dim", "decoder_ffn_dim"),
        dropout=float(cfg.get("dropout", 0.0)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        ffn_dropout=float(cfg.get("activation_dropout", 0.0)),
        max_len=cfg.max_len(cfg.need("max_position_embeddings"), max_len),
        share_embeddings=shared,
        share_output_embeddings=cfg.get("tie_word_embeddings", True),
        pad_id=cfg.need("pad_token_id"),
        layer_norm_epsilon=1e-5,  # torch.nn.LayerNorm's default, which these models use
        activation=cfg.activation(cfg.need("activation_function"), "activation_function"),
        embedding_scale=float(np.sqrt(d_model)) if cfg.get("scale_embedding") else 1.0,
        final_logits_bias=cfg.model_type != "m2m100",
        output_bias=False,
        **positions,
    )


def table(c: TransformerConfig, t: Tensors) -> Table:
    p = t.prefix("model.")
    embeddings = [f"{p}shared.weight", f"{p}encoder.embed_tokens.weight"]
    target = [f"{p}decoder.embed_tokens.weight"] + (
        ["lm_head.weight"] if c.share_output_embeddings else []
    )
    if c.share_embeddings:
        out: Table = {"target_embedding/embedding": tied(*embeddings, *target)}
    else:
        out = {
            "source_embedding/embedding": tied(*embeddings),
            "target_embedding/embedding": tied(*target),
        }
    if not c.share_output_embeddings:
        out["output/kernel"] = linear("lm_head.weight")
    if c.final_logits_bias:
        out["final_logits_bias"] = reshaped("final_logits_bias", lambda shape: (1, *shape))
    for side, stack in (("source", "encoder"), ("target", "decoder")):
        if c.absolute_positions == "learned":
            out[f"{side}_positions/embedding"] = leading_rows(f"{p}{stack}.embed_positions.weight")
        if c.embedding_norm:
            out |= _norm(f"{side}_embedding_norm", f"{p}{stack}.layernorm_embedding")
        layers = c.num_decoder_layers if stack == "decoder" else c.num_encoder_layers
        for i in range(layers):
            out |= _layer(c, f"{stack}/layer_{i}", f"{p}{stack}.layers.{i}", stack == "decoder")
        if c.has_final_norm:
            out |= _norm(f"{stack}/final_norm", f"{p}{stack}.layer_norm")
    return out


def _norm(ours: str, theirs: str) -> Table:
    return norm(ours, f"{theirs}.weight", f"{theirs}.bias")


def _attention(c, ours: str, theirs: str, fused: bool) -> Table:
    q, k, v, o = (f"{theirs}.{x}_proj.weight" for x in ("q", "k", "v", "out"))
    return attention(c, ours, q, k, v, o, fused=fused)


def _layer(c, ours: str, theirs: str, decoder: bool) -> Table:
    out = {
        **_attention(c, f"{ours}/self_attention", f"{theirs}.self_attn", True),
        **dense(f"{ours}/ffn/inner", f"{theirs}.fc1"),
        **dense(f"{ours}/ffn/outer", f"{theirs}.fc2"),
        **_norm(f"{ours}/norm_ffn", f"{theirs}.final_layer_norm"),
    }
    if decoder:
        out |= _norm(f"{ours}/norm_self", f"{theirs}.self_attn_layer_norm")
        out |= _attention(c, f"{ours}/memory_attention", f"{theirs}.encoder_attn", False)
        out |= _norm(f"{ours}/norm_memory", f"{theirs}.encoder_attn_layer_norm")
    else:
        out |= _norm(f"{ours}/norm_attention", f"{theirs}.self_attn_layer_norm")
    return out
