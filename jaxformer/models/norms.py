"""Normalisation layers by name: LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019).

``"layer"``: ``(x - mean) / sqrt(var + eps) * scale + bias`` (parameters ``scale``, ``bias``).
``"rms"``: ``x / sqrt(mean(x^2) + eps) * scale``, no mean subtraction and no bias, as T5 does
(its ``T5LayerNorm``); statistics in float32 (parameter ``scale``).

Epsilon: jaxformer's default is 1e-6. OpenNMT-tf's layer norms use 1e-3 (the Keras default it keeps),
T5 1e-6, BART/Marian/M2M100 1e-5: set ``TransformerConfig.layer_norm_epsilon`` to the model's value.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

NORMS: tuple[str, ...] = ("layer", "rms")
DEFAULT_EPSILON = 1e-6


def make_norm(
    kind: str = "layer",
    epsilon: float = DEFAULT_EPSILON,
    name: str | None = None,
    dtype: Any = jnp.float32,
) -> nn.Module:
    """A fresh norm module of ``kind`` (one of ``NORMS``)."""
    if kind == "layer":
        return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name)
    if kind == "rms":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, name=name)
    raise ValueError(f"norm must be one of {list(NORMS)}, got {kind!r}")
