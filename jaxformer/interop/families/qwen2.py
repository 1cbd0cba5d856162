"""Qwen2 and Qwen2.5 (``model_type`` ``qwen2``): Llama's tensor names (``llama.py``) with biases on
the query, key and value projections and none on the output, ``rope_theta`` 1e6 in the released
models. Its sliding window is off unless ``use_sliding_window`` (then refused: it applies to some
layers only).
"""

from __future__ import annotations

from jaxformer.interop.families import llama
from jaxformer.models.config import TransformerConfig

MODEL = llama.MODEL
IGNORED = llama.IGNORED
table = llama.table


def config(cfg, max_len: int | None) -> TransformerConfig:
    cfg.refuse(
        "use_sliding_window",
        "Qwen2's sliding window on the layers from max_window_layers on is not implemented",
    )
    llama.layer_kinds(cfg, "full_attention")
    return TransformerConfig(
        **llama.decoder_only(cfg, max_len, tied_default=False),
        activation="gated-" + cfg.activation(cfg.get("hidden_act", "silu"), "hidden_act"),
        attention_bias=True,  # on q, k and v
        attention_out_bias=False,
        ffn_bias=False,
    )
