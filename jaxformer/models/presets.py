"""Named configurations: jaxformer's presets and OpenNMT-tf's catalog, as ``TransformerConfig``s."""

from __future__ import annotations

from jaxformer.models.config import TransformerConfig

# OpenNMT-tf 2.32's Transformer computed number for number: Keras's layer norm epsilon 1e-3; sinusoids
# ``[sin | cos]`` from position 1 with rates ``10000^(-i / (D/2 - 1))``
# (``opennmt.layers.SinusoidalPositionEncoder``); a bias on the output projection, tied or not
# (``output_layer_bias=True``). Shaw relative positions are the same as jaxformer's.
OPENNMT_TF: dict = dict(
    layer_norm_epsilon=1e-3,
    position_layout="concat",
    position_rate_denominator="D/2-1",
    position_offset=1,
    output_bias=True,
)


def _opennmt_tf(num_units: int, num_heads: int, ffn: int, relative: bool = False, shared=False):
    """A model of OpenNMT-tf's catalog (``opennmt/models/catalog.py``): 6+6 layers, pre-norm."""
    return TransformerConfig(
        vocab_size=32000,
        d_model=num_units,
        num_heads=num_heads,
        num_encoder_layers=6,
        num_decoder_layers=6,
        ffn_dim=ffn,
        max_len=1024,
        maximum_relative_position=20 if relative else 0,
        share_embeddings=shared,
        share_output_embeddings=shared,
        **OPENNMT_TF,
    )


# OpenNMT-tf's catalog by its names (``onmt-main --model_type NAME``); pre_norm=False gives the
# post-norm variants (``Transformer(pre_norm=False)``). Vocabulary sizes come from the vocabularies.
OPENNMT_TF_PRESETS: dict[str, TransformerConfig] = {
    "TransformerBase": _opennmt_tf(512, 8, 2048),
    "TransformerBaseRelative": _opennmt_tf(512, 8, 2048, relative=True),
    "TransformerBaseSharedEmbeddings": _opennmt_tf(512, 8, 2048, shared=True),
    "TransformerBig": _opennmt_tf(1024, 16, 4096),
    "TransformerBigRelative": _opennmt_tf(1024, 16, 4096, relative=True),
    "TransformerBigSharedEmbeddings": _opennmt_tf(1024, 16, 4096, shared=True),
    "TransformerTiny": _opennmt_tf(64, 2, 64).replace(num_encoder_layers=2, num_decoder_layers=2),
}
OPENNMT_TF_PRESETS["Transformer"] = OPENNMT_TF_PRESETS["TransformerBase"]  # the catalog's aliases
OPENNMT_TF_PRESETS["TransformerRelative"] = OPENNMT_TF_PRESETS["TransformerBaseRelative"]

PRESETS: dict[str, TransformerConfig] = {
    # Small enough for every test to run in milliseconds.
    "tiny": TransformerConfig(
        vocab_size=32,
        d_model=32,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        ffn_dim=64,
        max_len=128,
    ),
    # The CTranslate2 benchmark's small model (issue 6).
    "small": TransformerConfig(
        vocab_size=8000,
        d_model=256,
        num_heads=4,
        num_encoder_layers=3,
        num_decoder_layers=3,
        ffn_dim=1024,
        max_len=1024,
    ),
    # Transformer base (Vaswani et al. 2017): 6+6 layers, D 512, N 8, F 2048.
    "base": TransformerConfig(
        vocab_size=32000,
        d_model=512,
        num_heads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        ffn_dim=2048,
        max_len=1024,
    ),
    # The toy model of the OpenNMT-tf inference article, as OpenNMT-tf computes it: vocab 26,
    # num_units 6, 1 layer, 2 heads, ffn_inner_dim 12, maximum_relative_position 8 (no sinusoids),
    # pre-norm, layer norm epsilon 1e-3.
    "article": TransformerConfig(
        vocab_size=26,
        d_model=6,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        ffn_dim=12,
        maximum_relative_position=8,
        max_len=256,
        **OPENNMT_TF,
    ),
    **{f"opennmt-tf/{name}": config for name, config in OPENNMT_TF_PRESETS.items()},
}


def preset(name: str, **overrides) -> TransformerConfig:
    """A named preset, optionally with some fields replaced: ``preset("tiny", pre_norm=False)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
