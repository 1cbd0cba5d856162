"""Marian (OPUS-MT, ``model_type`` ``marian``): BART's tensor names (``bart.py``) with post-norm,
fixed sinusoids ``[sin | cos]`` from position 0 (computed; files that store them are not read),
scaled embeddings, swish, ``final_logits_bias``; source and target tables shared or not
(``share_encoder_decoder_embeddings``); the decoder starts from ``<pad>``. The tokenizer is
sentencepiece + ``vocab.json`` (``hf_tokenizers.py``).
"""

from __future__ import annotations

from jaxformer.interop.families import bart

MODEL = bart.MODEL
IGNORED = (r"embed_positions\.weight$",)  # the fixed sinusoids, computed
table = bart.table


def config(cfg, max_len: int | None):
    return bart.config(
        cfg, max_len, pre_norm=False, positions="sinusoidal", position_layout="concat"
    )
