"""jaxformer: pure-functional JAX/Flax Transformers with explicit KV caches and OpenNMT-tf-exact search."""

from jaxformer import decoding, sharding
from jaxformer.cache import DecoderCache, KVCache
from jaxformer.config import PRESETS, TransformerConfig, preset
from jaxformer.decoder_only import DecoderOnlyLM
from jaxformer.encoder_decoder import Transformer
from jaxformer.generate import generate, init_params, transformer_step_fn
from jaxformer.hourglass import (
    HOURGLASS_PRESETS,
    HourglassCache,
    HourglassConfig,
    HourglassLM,
    hourglass_preset,
    hourglass_step_fn,
)

__all__ = [
    "HOURGLASS_PRESETS",
    "PRESETS",
    "DecoderCache",
    "DecoderOnlyLM",
    "HourglassCache",
    "HourglassConfig",
    "HourglassLM",
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "decoding",
    "generate",
    "hourglass_preset",
    "hourglass_step_fn",
    "init_params",
    "preset",
    "sharding",
    "transformer_step_fn",
]
