"""jaxformer: pure-functional JAX/Flax Transformers with explicit KV caches and OpenNMT-tf-exact search."""

from jaxformer import decoding
from jaxformer.cache import DecoderCache, KVCache
from jaxformer.config import PRESETS, TransformerConfig, preset
from jaxformer.decoder_only import DecoderOnlyLM
from jaxformer.encoder_decoder import Transformer
from jaxformer.generate import generate, init_params, transformer_step_fn

__all__ = [
    "PRESETS",
    "DecoderCache",
    "DecoderOnlyLM",
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "decoding",
    "generate",
    "init_params",
    "preset",
    "transformer_step_fn",
]
