"""Llama 1, 2, 3, 3.1, 3.2 (``model_type`` ``llama``) and Mistral (``mistral``: Llama with a sliding
window), and the tensor names Qwen2 and Gemma share (``qwen2.py``, ``gemma.py``).

Pre-norm RMS norms, rotary positions (``rope_theta``; ``rope_scaling`` ``linear`` or ``llama3``, at
the top of config.json or in transformers 5's ``rope_parameters``), grouped-query attention
(``num_key_value_heads``), SwiGLU (``gate_proj`` activated, times ``up_proj``, then ``down_proj``),
no biases unless ``attention_bias`` / ``mlp_bias`` (Llama), a tied or untied ``lm_head``. Tensor
names ``model.layers.{i}.*``, torch ``Linear`` weights ``[out, in]``.
"""

from __future__ import annotations

from typing import Any

from jaxformer.interop.weights import (
    CheckpointError,
    Table,
    Tensors,
    attention,
    ffn,
    linear,
    norm,
    tied,
)
from jaxformer.models.config import TransformerConfig
from jaxformer.models.decoder_only import DecoderOnlyLM
from jaxformer.models.rotary import ROPE_SCALINGS

MODEL = DecoderOnlyLM
IGNORED = (r"\.rotary_emb\.inv_freq$",)  # a buffer some older files store: computed from the config


def config(cfg, max_len: int | None) -> TransformerConfig:
    mistral = cfg.model_type == "mistral"
    if mistral:  # MistralForCausalLM has no biases, whatever the config says
        for name in ("attention_bias", "mlp_bias"):
            cfg.refuse(name, "Mistral's projections have no biases")
    window = cfg.get("sliding_window") if mistral else None
    layer_kinds(cfg, "sliding_attention" if window else "full_attention")
    return TransformerConfig(
        **decoder_only(cfg, max_len, tied_default=False),
        activation="gated-" + cfg.activation(cfg.get("hidden_act", "silu"), "hidden_act"),
        attention_bias=bool(cfg.get("attention_bias", False)),
        ffn_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=window,
    )


def decoder_only(cfg, max_len: int | None, tied_default: bool) -> dict[str, Any]:
    """The ``TransformerConfig`` fields Llama-shaped config.json files (Llama, Mistral, Qwen2,
    Gemma) spell alike: sizes, heads, RMS norms, rotary positions, tied output."""
    d_model, heads = cfg.need("hidden_size"), cfg.need("num_attention_heads")
    return dict(
        vocab_size=cfg.need("vocab_size"),
        d_model=d_model,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        attention_head_dim=cfg.get("head_dim", d_model // heads),
        num_encoder_layers=0,
        num_decoder_layers=cfg.need("num_hidden_layers"),
        ffn_dim=cfg.need("intermediate_size"),
        dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        ffn_dropout=0.0,
        max_len=cfg.max_len(cfg.need("max_position_embeddings"), max_len),
        pre_norm=True,
        norm="rms",
        layer_norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        embedding_scale=1.0,
        share_output_embeddings=bool(cfg.get("tie_word_embeddings", tied_default)),
        output_bias=False,
        **rotary(cfg),
    )


def rotary(cfg) -> dict[str, Any]:
    """``positions="rotary"`` with config.json's ``rope_theta`` and ``rope_scaling`` (the hub's
    spelling) or ``rope_parameters`` (transformers 5's, the theta inside). A scaling other than
    ``linear`` and ``llama3`` (``dynamic``, ``yarn``, ``longrope``, ...) or a partial rotation is
    refused by name."""
    parameters = cfg.get("rope_parameters")
    if parameters is not None:
        scaling = dict(parameters)
        theta = scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        partial = scaling.pop("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        field = "rope_parameters"
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), dict(cfg.get("rope_scaling") or {})
        partial, field = cfg.get("partial_rotary_factor"), "rope_scaling"
    if partial not in (None, 1, 1.0):
        raise CheckpointError(
            f"{cfg.path}: partial_rotary_factor={partial!r} is not supported: jaxformer rotates "
            "every channel of a head; jaxformer would compute another model"
        )
    kind = scaling.get("rope_type", scaling.get("type", "default" if not scaling else None))
    if kind == "default":
        scaling = None
    elif kind not in ROPE_SCALINGS:
        raise CheckpointError(
            f"{cfg.path}: {field} type {kind!r} is not supported: jaxformer implements "
            f"{list(ROPE_SCALINGS)} (and no scaling); jaxformer would compute another model"
        )
    else:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if isinstance(scaling.get(name), int):
                scaling[name] = float(scaling[name])
    return dict(positions="rotary", rope_theta=float(theta), rope_scaling=scaling)


def layer_kinds(cfg, kind: str) -> None:
    """transformers 5's ``layer_types`` (the attention of each layer), if written, must all be
    ``kind``: layers of different kinds are not supported."""
    kinds = cfg.get("layer_types")
    if kinds is not None and any(k != kind for k in kinds):
        raise CheckpointError(
            f"{cfg.path}: layer_types={kinds} is not supported: jaxformer gives every layer the "
            f"same attention ({kind}); jaxformer would compute another model"
        )


def table(c: TransformerConfig, t: Tensors) -> Table:
    lm_head = ["lm_head.weight"] if c.share_output_embeddings else []
    out: Table = {
        "embedding/embedding": tied("model.embed_tokens.weight", *lm_head),
        **norm("decoder/final_norm", "model.norm.weight"),
    }
    if not c.share_output_embeddings:
        out["output/kernel"] = linear("lm_head.weight")
    for i in range(c.num_decoder_layers):
        ours, theirs = f"decoder/layer_{i}", f"model.layers.{i}"
        q, k, v, o = (f"{theirs}.self_attn.{x}_proj.weight" for x in "qkvo")
        mlp = f"{theirs}.mlp"
        out |= {
            **norm(f"{ours}/norm_self", f"{theirs}.input_layernorm.weight"),
            **attention(c, f"{ours}/self_attention", q, k, v, o, fused=c.kv_heads == c.num_heads),
            **norm(f"{ours}/norm_ffn", f"{theirs}.post_attention_layernorm.weight"),
            **ffn(c, f"{ours}/ffn", f"{mlp}.gate_proj", f"{mlp}.down_proj", f"{mlp}.up_proj"),
        }
    return out
