"""Random initial parameters for any jaxformer model."""

from __future__ import annotations

import jax.numpy as jnp

from jaxformer.typing import PRNGKey, PyTree


def init_params(model, rng: PRNGKey, length: int = 4) -> PyTree:
    """Random parameters for ``model`` (their shapes do not depend on ``length``).

    Each model class names its call's token inputs in ``INPUTS`` (``("src_ids", "tgt_in_ids")`` for
    the encoder-decoder, ``("ids",)`` for the language models).
    """
    ids = jnp.ones([1, length], jnp.int32)
    return model.init(rng, *(ids for _ in type(model).INPUTS))["params"]
