"""M2M100 and NLLB-200 (``model_type`` ``m2m_100``): BART's tensor names (``bart.py``) with pre-norm and
final norms, sinusoids ``[sin | cos]`` with rates ``10000^(-i / (D/2 - 1))`` starting at position
``pad_token_id + 1`` (computed), no ``final_logits_bias``; the decoder starts from ``</s>`` and the
target language is forced as the first token (``target_prefix``).
"""

from __future__ import annotations

from jaxformer.interop.families import bart

MODEL = bart.MODEL
IGNORED = (r"embed_positions\.weight$",)  # the fixed sinusoids, computed
table = bart.table


def config(cfg, max_len: int | None):
    return bart.config(
        cfg,
        max_len,
        pre_norm=True,
        positions="sinusoidal",
        position_layout="concat",
        position_rate_denominator="D/2-1",
        position_offset=cfg.need("pad_token_id") + 1,
    )
