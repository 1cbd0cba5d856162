"""Feed-forward activations by name, plain and gated, resolved once when a module is built.

Plain: ``relu`` (Vaswani et al. 2017; jaxformer's default), ``gelu`` (exact, Hendrycks & Gimpel 2016),
``gelu_tanh`` (its tanh approximation, "gelu_new" in Hugging Face transformers), ``silu`` and its
other name ``swish`` (Ramachandran et al. 2017; Marian's "swish").

Gated (Shazeer 2020, "GLU Variants Improve Transformer"): ``gated-X`` for any plain X computes
``X(x W0) * (x W1)`` before the output projection, with two inner projections instead of one.
``geglu`` is ``gated-gelu`` (exact GELU) and ``swiglu`` is ``gated-silu``. T5 v1.1 and mT5
(Hugging Face ``feed_forward_proj="gated-gelu"``) gate with the *tanh* approximation: that is
``gated-gelu_tanh`` here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

PLAIN: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
ALIASES = {"geglu": "gated-gelu", "swiglu": "gated-silu"}
GATED_PREFIX = "gated-"
ACTIVATIONS: tuple[str, ...] = (
    *PLAIN,
    *(GATED_PREFIX + name for name in PLAIN),
    *ALIASES,
)


def resolve_activation(name: str) -> tuple[Callable, bool]:
    """``(function, gated)`` for an activation name of ``ACTIVATIONS``."""
    name = ALIASES.get(name, name)
    gated = name.startswith(GATED_PREFIX)
    base = name.removeprefix(GATED_PREFIX)
    if base not in PLAIN:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {name!r}")
    return PLAIN[base], gated
