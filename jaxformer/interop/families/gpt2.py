"""GPT-2 (``model_type`` ``gpt2``): learned positions, pre-norm LayerNorms (epsilon 1e-5), the tanh
GELU (``gelu_new``), biases everywhere, a tied output without bias.

Its projections are ``Conv1D`` modules whose weights are stored ``[in, out]`` (no transpose), and
its attention's ``c_attn`` holds q, k and v side by side (``[D, 3D]``, bias ``[3D]``): exactly
jaxformer's fused ``qkv [D, 3, N, H]`` once reshaped. Tensor names ``transformer.h.{i}.*``
(``transformer.`` left out in the original files, which also store the causal mask as
``attn.bias`` / ``attn.masked_bias`` buffers: not parameters, not read).

``scale_attn_by_inverse_layer_idx``, ``reorder_and_upcast_attn`` and ``add_cross_attention`` are
refused by name.
"""

from __future__ import annotations

from jaxformer.interop.weights import (
    Table,
    Tensors,
    dense,
    ffn,
    flat,
    kernel,
    leading_rows,
    linear,
    norm,
    tied,
)
from jaxformer.models.config import TransformerConfig
from jaxformer.models.decoder_only import DecoderOnlyLM

MODEL = DecoderOnlyLM
IGNORED = (r"\.attn\.(masked_)?bias$",)  # the causal mask, stored as buffers by older files


def config(cfg, max_len: int | None) -> TransformerConfig:
    cfg.refuse("scale_attn_by_inverse_layer_idx", "scores divided by the layer number")
    cfg.refuse("reorder_and_upcast_attn", "the attention's reordered, upcast products")
    cfg.refuse("add_cross_attention", "cross-attention layers (an encoder-decoder GPT-2)")
    d_model = cfg.need("n_embd", "hidden_size")
    return TransformerConfig(
        vocab_size=cfg.need("vocab_size"),
        d_model=d_model,
        num_heads=cfg.need("n_head", "num_attention_heads"),
        num_encoder_layers=0,
        num_decoder_layers=cfg.need("n_layer", "num_hidden_layers"),
        ffn_dim=cfg.get("n_inner") or 4 * d_model,
        dropout=0.0,
        attention_dropout=0.0,
        ffn_dropout=0.0,
        max_len=cfg.max_len(cfg.need("n_positions", "n_ctx"), max_len),
        pre_norm=True,
        norm="layer",
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
        activation=cfg.activation(
            cfg.get("activation_function", "gelu_new"), "activation_function"
        ),
        positions="learned",
        embedding_scale=1.0,
        query_scaling=bool(cfg.get("scale_attn_weights", True)),
        share_output_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        output_bias=False,
    )


def table(c: TransformerConfig, t: Tensors) -> Table:
    p = t.prefix("transformer.")
    lm_head = ["lm_head.weight"] if c.share_output_embeddings else []
    out: Table = {
        "embedding/embedding": tied(f"{p}wte.weight", *lm_head),
        "positions/embedding": leading_rows(f"{p}wpe.weight"),
        **_norm("decoder/final_norm", f"{p}ln_f"),
    }
    if not c.share_output_embeddings:
        out["output/kernel"] = linear("lm_head.weight")
    for i in range(c.num_decoder_layers):
        ours, theirs = f"decoder/layer_{i}", f"{p}h.{i}"
        out |= {
            **_norm(f"{ours}/norm_self", f"{theirs}.ln_1"),
            f"{ours}/self_attention/qkv/kernel": kernel(f"{theirs}.attn.c_attn.weight"),
            f"{ours}/self_attention/qkv/bias": flat(f"{theirs}.attn.c_attn.bias"),
            **dense(f"{ours}/self_attention/out", f"{theirs}.attn.c_proj", torch=False, inputs=2),
            **_norm(f"{ours}/norm_ffn", f"{theirs}.ln_2"),
            **ffn(c, f"{ours}/ffn", f"{theirs}.mlp.c_fc", f"{theirs}.mlp.c_proj", torch=False),
        }
    return out


def _norm(ours: str, theirs: str) -> Table:
    return norm(ours, f"{theirs}.weight", f"{theirs}.bias")
