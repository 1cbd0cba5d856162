"""Gemma (``model_type`` ``gemma``; Gemma 2 and 3 are other model types): Llama's tensor names
(``llama.py``) with RMS norms that multiply by ``1 + weight``, embeddings scaled by
``sqrt(hidden_size)``, a gated tanh-GELU (``hidden_activation``; transformers reads Gemma's
``hidden_act: gelu`` as the tanh approximation too), ``head_dim`` independent of the width,
multi-query attention in the 2B model, a tied output.

Gemma 2's attention and logit soft-capping and its ``query_pre_attn_scalar`` (other than
``head_dim``) are refused by name, as is bidirectional attention.
"""

from __future__ import annotations

from jaxformer.interop.families import llama
from jaxformer.models.config import TransformerConfig

MODEL = llama.MODEL
IGNORED = llama.IGNORED
table = llama.table


def config(cfg, max_len: int | None) -> TransformerConfig:
    cfg.refuse("attn_logit_softcapping", "Gemma 2's soft-capping of the attention scores")
    cfg.refuse("final_logit_softcapping", "Gemma 2's soft-capping of the logits")
    cfg.refuse("use_bidirectional_attention", "attention that sees later tokens")
    fields = llama.decoder_only(cfg, max_len, tied_default=True)
    cfg.refuse(
        "query_pre_attn_scalar",
        f"queries scaled by query_pre_attn_scalar**-0.5, not head_dim**-0.5 (head_dim "
        f"{fields['attention_head_dim']})",
        allowed=(None, fields["attention_head_dim"]),
    )
    activation = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    return TransformerConfig(
        **fields | dict(norm="gemma_rms", embedding_scale=None),  # None: sqrt(d_model)
        activation="gated-" + cfg.activation(activation, "hidden_activation"),
        attention_bias=bool(cfg.get("attention_bias", False)),
        ffn_bias=False,
    )
