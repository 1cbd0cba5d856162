"""int8 matrix products for inference: ``TransformerConfig(quantization="int8")``.

Every projection (attention's QKV / query / KV / output, the feed-forward's, the output layer, tied
or not) multiplies int8 by int8 into int32 and rescales in float32:

- weights: symmetric, one scale per output channel (the absolute maximum over the contracted axes
  maps to 127);
- activations: symmetric, one scale per row, computed on the fly at every product (dynamic).

This is the scheme of CTranslate2's int8 compute type (per-channel weight scales, per-row dynamic
activation scales; https://opennmt.net/CTranslate2/quantization.html), so the two are compared on the
same footing. The parameters stay float32: the weights are quantized inside the compiled program, and
in a decode loop XLA hoists that out of the loop (the weights are loop-invariant), so each step reads
int8 weights.

A product with fewer than ``MIN_ROWS`` rows stays float32: XLA:CPU has no int8 matrix-vector
product and converts both operands to int32 (slower than float32 at one row), while from 16 rows its
YNNPACK kernels take 0.56-0.65 of float32's time (``experiments/int8_probe.py``). The row count is a
static shape, so the choice is made once per compiled shape.

Attention's own products (scores, values against the cache) stay in the activation dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

QUANTIZATIONS = (None, "int8")
MIN_ROWS = 16  # fewer rows: float32 (see the module docstring)


def _quantize(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(q, scale)`` with ``x ~= q * scale``: int8 ``q`` in [-127, 127], ``scale`` over ``axes``
    (kept as size-1 axes); an all-zero slice gets scale 1 (its ``q`` is 0), never a division by 0."""
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return q, scale


def int8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` of activations ``lhs`` and weights ``rhs`` through int8 (see the module
    docstring); no batch dimensions (a Dense layer's product). Returns ``lhs``'s dtype."""
    del precision, preferred_element_type  # an int8 product has one precision
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if batch != ((), ()):
        raise ValueError(f"int8_dot_general: batch dimensions are not supported, got {batch}")
    lhs_contract = tuple(d % lhs.ndim for d in lhs_contract)
    rhs_contract = tuple(d % rhs.ndim for d in rhs_contract)
    lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract]
    rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract]
    rows = math.prod(lhs.shape[d] for d in lhs_free)
    if rows < MIN_ROWS:
        return lax.dot_general(lhs, rhs, dimension_numbers).astype(lhs.dtype)
    lhs_q, lhs_scale = _quantize(lhs, lhs_contract)  # scale per row
    rhs_q, rhs_scale = _quantize(rhs, rhs_contract)  # scale per output channel
    out = lax.dot_general(lhs_q, rhs_q, dimension_numbers, preferred_element_type=jnp.int32)
    # dot_general's output axes: lhs's free axes, then rhs's: put each scale on its own axes.
    lhs_scale = lhs_scale.reshape([lhs.shape[d] for d in lhs_free] + [1] * len(rhs_free))
    rhs_scale = rhs_scale.reshape([1] * len(lhs_free) + [rhs.shape[d] for d in rhs_free])
    return (out.astype(jnp.float32) * lhs_scale * rhs_scale).astype(lhs.dtype)


def dot_general_for(quantization: str | None):
    """The ``dot_general`` a Dense layer should use (None: flax's default, ``lax.dot_general``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    return None if quantization is None else int8_dot_general
