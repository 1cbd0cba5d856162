"""Three-line decoding: encode (or prefill), make the cache, run ``dynamic_decode``, all in one jit.

model = Transformer(preset("tiny"))
params = init_params(model, jax.random.key(0))
result = generate(model, params, src_ids, start_id=1, end_id=2, max_length=50)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.decoder_only import DecoderOnlyLM
from jaxformer.decoding import BestSampler, DecodingResult, GreedySearch, dynamic_decode
from jaxformer.encoder_decoder import Transformer
from jaxformer.hourglass import HourglassLM
from jaxformer.typing import Array, Int, PRNGKey, PyTree


def init_params(
    model: Transformer | DecoderOnlyLM | HourglassLM, rng: PRNGKey, length: int = 4
) -> PyTree:
    """Random parameters for ``model`` (shapes do not depend on ``length``)."""
    ids = jnp.ones([1, length], jnp.int32)
    args = (ids, ids) if isinstance(model, Transformer) else (ids,)
    return model.init(rng, *args)["params"]


def transformer_step_fn(model: Transformer, params: PyTree):
    """The search's step function for an encoder-decoder: the cache is the state."""

    def step_fn(ids, step, cache):
        return model.apply({"params": params}, ids, step, cache, method=Transformer.decode_step)

    return step_fn


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "start_id",
        "end_id",
        "max_length",
        "min_length",
        "strategy",
        "return_attention",
        "compat",
    ),
)
def _translate(
    model, params, src_ids, rng, sampler, *, start_id, end_id, max_length, min_length, strategy,
    return_attention, compat,
):  # fmt: skip
    memory, valid = model.apply({"params": params}, src_ids, method=Transformer.encode)
    cache = model.apply(
        {"params": params}, memory, valid, max_length, method=Transformer.init_cache
    )
    return dynamic_decode(
        transformer_step_fn(model, params),
        jnp.full([src_ids.shape[0]], start_id, jnp.int32),
        end_id,
        cache,
        strategy=strategy,
        sampler=sampler,
        max_length=max_length,
        min_length=min_length,
        rng=rng,
        attention_size=src_ids.shape[1],
        return_attention=return_attention,
        compat=compat,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "end_id",
        "max_length",
        "min_length",
        "strategy",
        "compat",
    ),
)
def _continue(
    model, params, prompt_ids, rng, sampler, *, end_id, max_length, min_length, strategy, compat
):
    offset = prompt_ids.shape[1] - 1  # the last prompt token is the search's start id
    lm = type(model)
    cache = model.apply(
        {"params": params}, prompt_ids.shape[0], offset + max_length, method=lm.init_cache
    )

    def step_fn(ids, step, cache):
        logits, cache, _ = model.apply(
            {"params": params}, ids, step + offset, cache, method=lm.decode_step
        )
        return logits, cache

    if offset > 0 and hasattr(lm, "prefill"):  # the whole prompt in one pass
        _, cache = model.apply({"params": params}, prompt_ids[:, :-1], cache, method=lm.prefill)
    elif offset > 0:  # one cached step per prompt token, in a scan

        def feed(cache, t):
            _, cache = step_fn(prompt_ids[:, t], t - offset, cache)
            return cache, None

        cache, _ = jax.lax.scan(feed, cache, jnp.arange(offset, dtype=jnp.int32))

    return dynamic_decode(
        step_fn,
        prompt_ids[:, -1],
        end_id,
        cache,
        strategy=strategy,
        sampler=sampler,
        max_length=max_length,
        min_length=min_length,
        rng=rng,
        compat=compat,
    )


def generate(
    model: Transformer | DecoderOnlyLM | HourglassLM,
    params: PyTree,
    inputs: Int[Array | np.ndarray, "B S"],
    *,
    end_id: int,
    start_id: int | None = None,
    max_length: int = 250,
    min_length: int = 0,
    strategy=GreedySearch(),
    sampler=BestSampler(),
    rng: PRNGKey | None = None,
    return_attention: bool = False,
    compat: str | None = None,
) -> DecodingResult:
    """Decode with a Transformer (``inputs`` = source ids) or continue prompts with a decoder-only LM.

    Encoder-decoder: every hypothesis starts from ``start_id``; ``max_length`` bounds the target.
    Decoder-only (``DecoderOnlyLM``, ``HourglassLM``): ``inputs`` are prompts of equal length P >= 1; the
    first P-1 tokens go into the cache (in one pass where the model has ``prefill``, else one cached
    step per token inside a scan) and the search starts from the last one; ``max_length`` new tokens at
    most.
    The whole thing is one jit-compiled function per shape and option set; the sampler's temperature is
    data, so changing it per call does not recompile.
    """
    inputs = jnp.asarray(inputs, jnp.int32)
    if inputs.ndim != 2 or inputs.shape[1] < 1:
        raise ValueError(f"inputs must be [batch, length >= 1] token ids, got shape {inputs.shape}")
    if isinstance(model, Transformer):
        if start_id is None:
            raise ValueError("an encoder-decoder needs start_id (the target's start token)")
        return _translate(
            model, params, inputs, rng, sampler, start_id=start_id, end_id=end_id,
            max_length=max_length, min_length=min_length, strategy=strategy,
            return_attention=return_attention, compat=compat,
        )  # fmt: skip
    if isinstance(model, DecoderOnlyLM | HourglassLM):
        if return_attention:
            raise ValueError("a decoder-only LM has no source to return attention over")
        return _continue(
            model, params, inputs, rng, sampler, end_id=end_id, max_length=max_length,
            min_length=min_length, strategy=strategy, compat=compat,
        )  # fmt: skip
    raise TypeError(
        f"generate needs a Transformer, DecoderOnlyLM or HourglassLM, got {type(model).__name__}"
    )
