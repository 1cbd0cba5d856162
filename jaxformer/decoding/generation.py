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

from jaxformer.decoding import (
    BeamSearch,
    BestSampler,
    DecodingResult,
    GreedySearch,
    dynamic_decode,
)
from jaxformer.decoding.loop import COMPAT_MODES
from jaxformer.models.cache import DecoderCache
from jaxformer.models.decoder_only import DecoderOnlyLM
from jaxformer.models.encoder_decoder import Transformer
from jaxformer.models.hourglass import HourglassLM
from jaxformer.typing import Array, Int, PRNGKey, PyTree


def transformer_step_fn(model: Transformer, params: PyTree, memory: DecoderCache | None = None):
    """The search's step function for an encoder-decoder.

    Without ``memory`` the whole ``DecoderCache`` is the search state: tiled to ``B*W`` rows and
    reordered with the beams at every step. With ``memory`` (the cache from ``init_cache``) its
    cross-attention keys/values and source mask are read from there, once per batch entry, and the
    state is the cache without them (``without_memory(cache)``): the search tiles and reorders only the
    self-attention caches. Both give the same results.
    """

    def step_fn(ids, step, cache):
        if memory is not None:
            cache = cache.replace(memory=memory.memory, memory_mask=memory.memory_mask)
        logits, cache, attention = model.apply(
            {"params": params}, ids, step, cache, method=Transformer.decode_step
        )
        if memory is not None:
            cache = without_memory(cache)
        return logits, cache, attention

    return step_fn


def without_memory(cache: DecoderCache) -> DecoderCache:
    """The self-attention part of a decoder cache (the search state when the memory is shared)."""
    return cache.replace(memory=(), memory_mask=None)


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
        transformer_step_fn(model, params, memory=cache),  # the memory is never tiled nor reordered
        jnp.full([src_ids.shape[0]], start_id, jnp.int32),
        end_id,
        without_memory(cache),
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


def _check_inputs(model, inputs) -> Array:
    """``inputs`` as int32 ``[B, S]`` after checking the dtype, the rank and (when concrete) the ids."""
    encoder_decoder = isinstance(model, Transformer)
    array = inputs if hasattr(inputs, "dtype") else np.asarray(inputs)
    if array.size and not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"inputs must be integer token ids, got dtype {array.dtype}")
    inputs = jnp.asarray(inputs, jnp.int32)
    shortest = 0 if encoder_decoder else 1
    if inputs.ndim != 2 or inputs.shape[0] < 1 or inputs.shape[1] < shortest:
        raise ValueError(
            f"inputs must be [batch >= 1, length >= {shortest}] token ids, got shape {inputs.shape}"
        )
    config = model.config
    what = "source" if encoder_decoder else "prompt"
    vocab = config.source_vocab_size if encoder_decoder else config.vocab_size
    if inputs.shape[1] > config.max_len:
        raise ValueError(
            f"inputs: a {what} of length {inputs.shape[1]} is longer than the model's "
            f"max_len={config.max_len}; truncate it or use a model with a larger max_len"
        )
    if inputs.size and not isinstance(inputs, jax.core.Tracer):
        low, high = int(jnp.min(inputs)), int(jnp.max(inputs))
        if low < 0 or high >= vocab:
            raise ValueError(
                f"inputs: {what} ids must be in [0, {vocab}) (the {what} vocabulary), got values "
                f"in [{low}, {high}]"
            )
    return inputs


def _check_options(model, inputs, start_id, end_id, max_length, min_length, strategy, sampler):
    """Static options checked against the model's vocabulary and maximum length, before tracing."""
    config = model.config
    vocab = config.vocab_size
    if not isinstance(strategy, GreedySearch | BeamSearch):
        raise TypeError(f"strategy must be GreedySearch() or BeamSearch(...), got {strategy!r}")
    if isinstance(model, Transformer) and start_id is None:
        raise ValueError("an encoder-decoder needs start_id (the target's start token)")
    for name, value in (("end_id", end_id), ("start_id", start_id)):
        if name == "start_id" and (value is None or not isinstance(model, Transformer)):
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an int in [0, {vocab}), got {value!r}")
        if not 0 <= value < vocab:
            raise ValueError(f"{name}={value} is outside the target vocabulary [0, {vocab})")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    if isinstance(min_length, bool) or not isinstance(min_length, int):
        raise ValueError(f"min_length must be an int in [0, max_length], got {min_length!r}")
    if not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be in [0, max_length={max_length}], got {min_length}")
    # Target positions 0 .. max_length-1 (a prompt's P-1 tokens come first in a decoder-only LM).
    positions = max_length + (0 if isinstance(model, Transformer) else inputs.shape[1] - 1)
    if positions > config.max_len:
        allowed = config.max_len - positions + max_length
        raise ValueError(
            f"max_length={max_length} needs {positions} positions, more than the model's "
            f"max_len={config.max_len}; allowed here: max_length <= {allowed}"
        )
    if strategy.width > vocab:
        raise ValueError(f"beam_size={strategy.width} must be in [1, vocab_size={vocab}]")
    candidates = strategy.width * vocab
    topk = getattr(sampler, "topk", 0)
    if topk > candidates:
        raise ValueError(
            f"topk={topk} must be in [0, {candidates}] (0 = all; {strategy.width} beam(s) x "
            f"vocab_size {vocab} candidates)"
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
    if not isinstance(model, Transformer | DecoderOnlyLM | HourglassLM):
        raise TypeError(
            f"generate needs a Transformer, DecoderOnlyLM or HourglassLM, got {type(model).__name__}"
        )
    inputs = _check_inputs(model, inputs)
    _check_options(model, inputs, start_id, end_id, max_length, min_length, strategy, sampler)
    if getattr(sampler, "needs_rng", False) and rng is None:
        raise ValueError(f"{type(sampler).__name__} needs rng=jax.random.key(...)")
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    if isinstance(model, Transformer):
        if inputs.shape[1] == 0:  # empty sources: one padding column, i.e. fully masked memory
            inputs = jnp.full([inputs.shape[0], 1], model.config.pad_id, jnp.int32)
        return _translate(
            model, params, inputs, rng, sampler, start_id=start_id, end_id=end_id,
            max_length=max_length, min_length=min_length, strategy=strategy,
            return_attention=return_attention, compat=compat,
        )  # fmt: skip
    if return_attention:
        raise ValueError("a decoder-only LM has no source to return attention over")
    return _continue(
        model, params, inputs, rng, sampler, end_id=end_id, max_length=max_length,
        min_length=min_length, strategy=strategy, compat=compat,
    )  # fmt: skip
