"""Normalisation layers by name: LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019).

``"layer"``: ``(x - mean) / sqrt(var + eps) * scale + bias`` (parameters ``scale``, ``bias``).
``"rms"``: ``x / sqrt(mean(x^2) + eps) * scale``, no mean subtraction and no bias, as T5 does
(its ``T5LayerNorm``) and Llama, Mistral, Qwen2 (``LlamaRMSNorm``); statistics in float32
(parameter ``scale``, initialised at 1).
``"gemma_rms"``: ``x / sqrt(mean(x^2) + eps) * (1 + scale)``, Gemma's ``GemmaRMSNorm``: the stored
weight is the offset from 1 (parameter ``scale``, initialised at 0); computed in float32, the
multiplication by ``1 + scale`` included, then cast to the activations' dtype.

Epsilon: jaxformer's default is 1e-6. OpenNMT-tf's layer norms use 1e-3 (the Keras default it keeps),
T5 1e-6, BART/Marian/M2M100 1e-5: set ``TransformerConfig.layer_norm_epsilon`` to the model's value.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS: tuple[str, ...] = ("layer", "rms", "gemma_rms")
DEFAULT_EPSILON = 1e-6


class OffsetRMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + scale`` (``"gemma_rms"``), in float32."""

    epsilon: float = DEFAULT_EPSILON
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., D] --> [..., D]
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + scale.shape)  # [1.., D]
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (normed * (1.0 + scale)).astype(self.dtype)


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
    if kind == "gemma_rms":
        return OffsetRMSNorm(epsilon, dtype, name=name)
    raise ValueError(f"norm must be one of {list(NORMS)}, got {kind!r}")
