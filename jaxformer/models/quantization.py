"""int8 matrix products for inference: ``TransformerConfig(quantization="int8")``.

Every projection (attention's QKV / query / KV / output, the feed-forward's, the output layer, tied
or not) multiplies int8 by int8 into int32 and rescales in float32:

- weights: symmetric, one scale per output channel (the absolute maximum over the contracted axes
  maps to 127);
- activations: symmetric, one scale per row, computed on the fly at every product (dynamic).

This is the scheme of CTranslate2's int8 compute type (per-channel weight scales, per-row dynamic
activation scales; https://opennmt.net/CTranslate2/quantization.html), so the two are compared on the
same footing.

A product with fewer than ``MIN_ROWS`` rows stays float32: XLA:CPU has no int8 matrix-vector
product and converts both operands to int32 (slower than float32 at one row), while from 16 rows its
YNNPACK kernels take 0.56-0.65 of float32's time (``experiments/int8_probe.py``). The row count is a
static shape, so the choice is made once per compiled shape.

Attention's own products (scores, values against the cache) stay in the activation dtype.

Two ways to hold the weights:

- float32 parameters (any trained or loaded model): each product quantizes its weight inside the
  compiled program. In a decode loop XLA hoists that out of a chunk's scan but not out of the loop
  over chunks, so the weights are quantized again every 8 steps (``base`` batch 64 / beam 4 on a
  2-core CPU: 3-6% of a step, ``docs/models.md``).
- ``quantize_params(params)`` once: every projection's ``kernel`` becomes int8 and gets its
  per-column ``scale`` beside it (``{"kernel": int8, "bias": ..., "int8": {"scale": float32}}``);
  the products then read them as they are. Meant for batched decoding: a product of fewer than
  ``MIN_ROWS`` rows dequantizes the kernel (float32 again, as XLA:CPU has no faster int8
  matrix-vector product). The tied output projection keeps its float32 table (it is also the
  embedding) and quantizes it per product.

A model built without ``quantization="int8"`` refuses int8 kernels (instead of casting them to
float32 and computing with unscaled weights).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
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


def int8_dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, rhs_scale=None
):
    """``lax.dot_general`` of activations ``lhs`` and weights ``rhs`` through int8 (see the module
    docstring); no batch dimensions (a Dense layer's product). Returns ``lhs``'s dtype.

    ``rhs_scale``: ``rhs`` is already int8 and this is its scale (``quantize_params``)."""
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
        if rhs_scale is not None:  # dequantized: XLA:CPU's float32 matrix-vector product is faster
            rhs = rhs.astype(jnp.float32) * rhs_scale
        return lax.dot_general(lhs, rhs.astype(lhs.dtype), dimension_numbers).astype(lhs.dtype)
    lhs_q, lhs_scale = _quantize(lhs, lhs_contract)  # scale per row
    if rhs_scale is None:
        rhs, rhs_scale = _quantize(rhs, rhs_contract)  # scale per output channel
    out = lax.dot_general(lhs_q, rhs, dimension_numbers, preferred_element_type=jnp.int32)
    # dot_general's output axes: lhs's free axes, then rhs's: put each scale on its own axes.
    lhs_scale = lhs_scale.reshape([lhs.shape[d] for d in lhs_free] + [1] * len(rhs_free))
    rhs_scale = rhs_scale.reshape([1] * len(lhs_free) + [rhs.shape[d] for d in rhs_free])
    return (out.astype(jnp.float32) * lhs_scale * rhs_scale).astype(lhs.dtype)


class Int8Product(nn.Module):
    """A Dense layer's ``dot_general`` in int8; with an int8 kernel, reads its ``scale`` param."""

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if rhs.dtype != jnp.int8:
            return int8_dot_general(lhs, rhs, dimension_numbers)
        if not self.has_variable("params", "scale"):
            raise ValueError(
                f"{self.scope.path_text}: an int8 kernel without its scale (make int8 parameters "
                "with jaxformer.models.quantization.quantize_params)"
            )
        scale = self.get_variable("params", "scale")
        contract = {d % rhs.ndim for d in dimension_numbers[0][1]}
        expected = tuple(1 if d in contract else n for d, n in enumerate(rhs.shape))
        if scale.shape != expected:
            raise ValueError(
                f"{self.scope.path_text}: the int8 kernel {rhs.shape} has a scale of shape "
                f"{scale.shape}, expected {expected} (one per output channel)"
            )
        return int8_dot_general(lhs, rhs, dimension_numbers, rhs_scale=scale)


def _promote(*args, dtype=None, inexact=True, int8: bool):
    """flax's ``promote_dtype`` for ``(inputs, kernel, bias)``, leaving an int8 kernel as it is
    when ``int8`` and refusing it otherwise (a float model would use its unscaled values)."""
    inputs, kernel, bias = args
    if kernel.dtype != jnp.int8:
        return dtypes.promote_dtype(inputs, kernel, bias, dtype=dtype, inexact=inexact)
    if not int8:
        raise ValueError(
            "these parameters hold int8 kernels (quantize_params): build the model with "
            "TransformerConfig(quantization='int8')"
        )
    inputs, _, bias = dtypes.promote_dtype(inputs, None, bias, dtype=dtype, inexact=inexact)
    return inputs, kernel, bias


def check_quantization(quantization: str | None) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")


def dense_options(quantization: str | None) -> dict:
    """Keyword arguments for a projection's ``nn.Dense`` / ``nn.DenseGeneral``."""
    check_quantization(quantization)
    int8 = quantization == "int8"
    options = {"promote_dtype": functools.partial(_promote, int8=int8)}
    if int8:
        options["dot_general_cls"] = functools.partial(Int8Product, name="int8")
    return options


# The projections' module names, and the kernels that contract more than their first axis.
PROJECTIONS = ("qkv", "query", "kv", "out", "inner", "inner_linear", "outer", "output")
_CONTRACT_ALL_BUT_LAST = ("out",)  # attention output: [N, H, D]


def quantize_params(params):
    """A copy of a Transformer's / DecoderOnlyLM's parameters with every projection kernel in int8
    and its per-column scale beside it (see the module docstring); for a model built with
    ``quantization="int8"``. Everything else (embeddings, norms, biases) is unchanged."""

    def walk(tree, name):
        if not isinstance(tree, dict):
            return tree
        kernel = tree.get("kernel")
        if name in PROJECTIONS and kernel is not None and kernel.dtype != jnp.int8:
            n = kernel.ndim - 1 if name in _CONTRACT_ALL_BUT_LAST else 1
            q, scale = jax.jit(_quantize, static_argnums=1)(kernel, tuple(range(n)))
            return {**tree, "kernel": q, "int8": {"scale": scale}}
        return {key: walk(value, key) for key, value in tree.items()}

    return walk(dict(params), "")
