"""jaxformer: pure-functional JAX/Flax Transformers with explicit KV caches and OpenNMT-tf-exact search.

The layout follows the architecture (arrows run one way: models <- decoding <- training / interop / serving <- cli):

- ``jaxformer.models``: configs, layers, attention, KV caches, the encoder-decoder, the decoder-only LM
  and the Hourglass LM.
- ``jaxformer.decoding``: the model-agnostic search (``dynamic_decode``), its state protocol, one
  adapter per model family, ``generate`` and text-level inference.
- ``jaxformer.training``: losses, the train step, ``fit``, checkpoints, metrics, sharding.
- ``jaxformer.data``: tokenizers, corpora, batching. ``jaxformer.interop``: export to CTranslate2,
  ``load_pretrained`` (Hugging Face directories and OpenNMT-tf checkpoints, without their frameworks).
- ``jaxformer.serving``: the continuous-batching engine (``Engine``): many requests on fixed slots,
  each with the result ``generate`` gives it alone.
"""

from jaxformer import decoding
from jaxformer.decoding.generation import generate
from jaxformer.interop.pretrained import Pretrained
from jaxformer.interop.registry import load_pretrained
from jaxformer.models.cache import DecoderCache, KVCache
from jaxformer.models.config import TransformerConfig
from jaxformer.models.decoder_only import DecoderOnlyLM
from jaxformer.models.encoder_decoder import Transformer
from jaxformer.models.hourglass import (
    HOURGLASS_PRESETS,
    HourglassCache,
    HourglassConfig,
    HourglassLM,
    hourglass_preset,
)
from jaxformer.models.params import init_params
from jaxformer.models.presets import PRESETS, preset
from jaxformer.training import sharding

__all__ = [
    "HOURGLASS_PRESETS",
    "PRESETS",
    "DecoderCache",
    "DecoderOnlyLM",
    "HourglassCache",
    "HourglassConfig",
    "HourglassLM",
    "KVCache",
    "Pretrained",
    "Transformer",
    "TransformerConfig",
    "decoding",
    "generate",
    "hourglass_preset",
    "init_params",
    "load_pretrained",
    "preset",
    "sharding",
]
