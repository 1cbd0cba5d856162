"""``generate``: decode with any model that has an adapter, in one jit-compiled function.

    model = Transformer(preset("tiny"))
    params = init_params(model, jax.random.key(0))
    result = generate(model, params, src_ids, start_id=1, end_id=2, max_length=50)

The model's adapter (``adapters.py``) prepares the search (encode or prefill, the caches, the start
ids) and takes each step; ``dynamic_decode`` does the rest. Nothing here depends on the model family.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.decoding import options as opt
from jaxformer.decoding.adapters import Adapter, InputSpec, adapter_for, step_function
from jaxformer.decoding.loop import run_search
from jaxformer.decoding.result import DecodingResult
from jaxformer.decoding.samplers import BestSampler
from jaxformer.decoding.stop import StopTable
from jaxformer.decoding.strategies import GreedySearch
from jaxformer.typing import Array, Int, PRNGKey, PyTree

# Static: what fixes shapes or the program, with the static fields of the checked options
# (``opt.SearchOptions``). Their strategy and sampler are pytrees whose penalties, temperature and
# top-p are data, and ``min_length`` is data too (``search_step.SearchData``): one program serves every
# value, and the serving engine runs the same code with per-request values.
STATIC = ("adapter", "start_id", "return_attention")


# XLA options for decoding loops on CPU. A step reads each layer's KV cache, then writes one slot of
# it in place (``MultiHeadAttention.self_attend_cached``). XLA:CPU's default copy insertion cannot
# tell that the read comes before the write inside a loop and copies every layer's whole cache at
# every step (cost in proportion to the cache length: 1.9x slower per token at 1024 slots, batch 1);
# its region-based live-range analysis sees the order and keeps the update in place. GPU and TPU
# compilers get no options from here. To decode on CPU inside your own ``jax.jit``, pass
# ``compiler_options=jaxformer.decoding.cpu_compiler_options()`` to it.
CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def cpu_compiler_options(backend: str | None = None) -> dict | None:
    """``CPU_COMPILER_OPTIONS`` when compiling for CPU (default: JAX's default backend), else None.

    An option that the installed XLA does not know (a later jaxlib may drop one) is left out with a
    warning naming it: decoding then runs without it (slower, same results) instead of failing."""
    if (backend or jax.default_backend()) != "cpu":
        return None
    return dict(_known_options(tuple(CPU_COMPILER_OPTIONS.items())))


@functools.cache
def _known_options(options: tuple) -> tuple:
    """The ``(name, value)`` pairs that XLA accepts (each tried once on a trivial program)."""
    known = []
    for name, value in options:
        try:
            jax.jit(lambda: jnp.zeros(()), compiler_options={name: value}).lower().compile()
        except jax.errors.JaxRuntimeError as error:
            if "no such compile option" not in str(error).lower():
                raise
            warnings.warn(
                f"jaxformer: this XLA does not know the compile option {name!r}; decoding on CPU "
                "runs without it (slower, the same results)",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        known.append((name, value))
    return tuple(known)


@functools.cache
def _jitted(backend: str):
    return jax.jit(_decode, static_argnames=STATIC, compiler_options=cpu_compiler_options(backend))


def _tracing(args) -> bool:
    """Whether this call is inside a transformation (``jax.jit`` refuses options on a nested jit)."""
    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # a JAX without it: judge by the arguments alone
        return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
    return not trace_state_clean()


def _run(*args, **kwargs) -> DecodingResult:
    """``_decode`` compiled once per shape and options (the backend is read at the first call)."""
    if _tracing(args):
        return _nested(*args, **kwargs)
    return _jitted(jax.default_backend())(*args, **kwargs)


_run._cache_size = lambda: _jitted(jax.default_backend())._cache_size()  # compilations so far


def _decode(
    adapter, params, inputs, lengths, options: opt.SearchOptions, stop=None, *, start_id,
    return_attention,
):  # fmt: skip
    prepared = adapter.prepare(params, inputs, lengths, start_id, options.max_length)
    context = None  # the history the repetition options read: an LM's prompt, else the start
    if not adapter.inputs.needs_start_id:
        full = jnp.full(inputs.shape[:1], inputs.shape[1], jnp.int32)
        context = (inputs, full if lengths is None else lengths)
    return run_search(
        step_function(adapter, params),
        prepared.start_ids,
        prepared.state,
        options,
        attention_size=prepared.attention_size,
        return_attention=return_attention,
        shared=prepared.shared,  # the memory is never tiled nor reordered
        context=context,
        stop=stop,
    )


_nested = jax.jit(_decode, static_argnames=STATIC)  # inside a caller's trace: no options allowed


def generate(
    model,
    params: PyTree,
    inputs: Int[Array | np.ndarray, "B S"] | list,
    *,
    end_id: int | tuple[int, ...],
    start_id: int | None = None,
    max_length: int | None = None,
    min_length: int = 0,
    strategy=GreedySearch(),
    sampler=BestSampler(),
    rng: PRNGKey | None = None,
    return_attention: bool = False,
    compat: str | None = None,
    prompt_lengths: Int[Array | np.ndarray, " B"] | list | tuple | None = None,
    target_prefix: Int[Array | np.ndarray, "_B P"] | list | None = None,
    suppress_ids: tuple[int, ...] | list[int] = (),
    chunk_size: int | None = 8,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    stop: StopTable | None = None,
) -> DecodingResult:
    """Translate sources with an encoder-decoder, or continue prompts with a decoder-only LM.

    ``inputs``: ``int32[B, S]`` right-padded with the model's ``pad_id``, or a list of token-id lists
    of any lengths (padded here). Encoder-decoder: every hypothesis starts from ``start_id``;
    ``max_length`` bounds the target (default: 250, or what the model's positions allow when
    fewer: ``default_max_length``). Decoder-only (``DecoderOnlyLM``, ``HourglassLM``): ``inputs``
    are prompts (P >= 1 tokens); ``prompt_lengths`` ``[B]`` gives each padded prompt's real length
    (None: all P, or taken from a list); all but each prompt's last token go into the cache, the
    search starts from its last one and writes at most ``max_length`` new tokens. A row's result is
    the one it has alone, whatever the lengths of the others. ``end_id``: the end token, or a tuple
    of them (Llama 3 ends on any of three; ``pre.end_id``): each hypothesis keeps the one it emitted
    at ``ids[b, w, lengths[b, w]]``, the positions after it hold the first.

    ``target_prefix`` (encoder-decoder only): int32 ``[B, P]`` or B lists of P ids, forced right
    after ``start_id`` in every hypothesis of entry b (NLLB's target-language token; CTranslate2's
    ``target_prefix``; Hugging Face's ``forced_bos_token_id`` is P = 1). ``result.ids[b, w, :P]``
    is the prefix and ``lengths`` count it; the forced tokens add 0 to ``log_probs`` and ``scores``
    (Hugging Face's and CTranslate2's convention), so those are the log-probability of the free
    tokens given the prefix. ``max_length`` and ``min_length`` count from the first token, prefix
    included (P < ``max_length``). Beam search follows the prefix with one live beam, then expands
    it: the W hypotheses share the prefix and differ after it. ``suppress_ids``: token ids that
    never appear (their logits are -inf at every free step, before the log-softmax): Marian's
    ``bad_words_ids=[[pad_id]]``, CTranslate2's ``suppress_sequences`` of single tokens; never
    ``end_id``. Both work with every strategy, sampler and ``compat`` mode (``dynamic_decode``'s
    module docstring has the details); the prefix's ids are data: one trace per prefix length.
    The whole thing is one jit-compiled function per shape and option set; the penalties, the
    sampler's temperature and top-p (below 1) and ``min_length`` are data, so changing them per
    call does not recompile. ``chunk_size``: decode steps between two
    checks for the early exit once every row has finished (``dynamic_decode``'s; None: one scan of
    ``max_length`` steps, no early exit); the results do not depend on it.
    ``repetition_penalty`` (CTRL's θ; 1: off) and ``no_repeat_ngram_size`` (0: off) discourage or
    forbid repeating what a hypothesis holds: a decoder-only LM's prompt and what it generated,
    an encoder-decoder's start token and what it generated (``decoding/repetition.py``).
    ``stop``: a ``stop.StopTable`` (``stop_table(tokenizer.token_bytes(), strings, V)``): a
    hypothesis ends at the first token that completes one of the strings (``decoding/stop.py``;
    text callers cut the match off with ``cut_at_stop``).
    """
    adapter = adapter_for(model)
    spec = adapter.inputs
    inputs, lengths = _as_batch(adapter, inputs, prompt_lengths)
    if max_length is None:
        max_length = default_max_length(adapter, inputs.shape[1])
    check_for_family(spec, start_id, return_attention=return_attention, target_prefix=target_prefix)
    options = opt.check_search(
        strategy, sampler, end_id=end_id, max_length=max_length, min_length=min_length,
        compat=compat, rng=rng, chunk_size=chunk_size, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, suppress_ids=suppress_ids,
        target_prefix=target_prefix, vocab=spec.target_vocab_size, batch=inputs.shape[0],
        start_id=start_id if spec.needs_start_id else None, stop=stop,
    )  # fmt: skip
    _check_positions(adapter, inputs.shape[1], max_length)
    return _run(
        adapter, params, inputs, lengths, options, stop, start_id=start_id,
        return_attention=return_attention,
    )  # fmt: skip


DEFAULT_MAX_LENGTH = 250  # OpenNMT-tf's maximum_decoding_length


def default_max_length(adapter: Adapter, input_length: int) -> int:
    """``generate``'s ``max_length`` when none is given: OpenNMT-tf's 250, or fewer when the
    model's positions end sooner (what is left after a decoder-only LM's prompt)."""
    limit = adapter.inputs.max_len - adapter.positions(input_length, 0)
    if limit < 1:
        raise ValueError(
            f"inputs: a {adapter.inputs.name} of length {input_length} leaves no position free in "
            f"the model's max_len={adapter.inputs.max_len}"
        )
    return min(DEFAULT_MAX_LENGTH, limit)


def _as_batch(adapter: Adapter, inputs, prompt_lengths) -> tuple[Array, Array | None]:
    """``inputs`` as int32 ``[B, P]`` and the prompt lengths (None: all P), after checking them."""
    spec = adapter.inputs
    if isinstance(inputs, list | tuple) and inputs and all(np.ndim(x) == 1 for x in inputs):
        rows = [np.asarray(x) for x in inputs]
        if len({len(x) for x in rows}) > 1:  # ragged: right-pad, remember the lengths
            width = max(len(x) for x in rows)
            padded = np.full((len(rows), width), spec.pad_id, np.int64)
            for i, row in enumerate(rows):
                padded[i, : len(row)] = row
            if prompt_lengths is None and not spec.needs_start_id:
                prompt_lengths = [len(x) for x in rows]
            inputs = padded
    array = inputs if hasattr(inputs, "dtype") else np.asarray(inputs)
    if array.size and not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"inputs must be integer token ids, got dtype {array.dtype}")
    array = jnp.asarray(array, jnp.int32)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < spec.shortest:
        raise ValueError(
            f"inputs must be [batch >= 1, length >= {spec.shortest}] token ids (or a list of "
            f"token-id lists), got shape {array.shape}"
        )
    if array.shape[1] > spec.max_len:
        raise ValueError(
            f"inputs: a {spec.name} of length {array.shape[1]} is longer than the model's "
            f"max_len={spec.max_len}; truncate it or use a model with a larger max_len"
        )
    if array.size and not isinstance(array, jax.core.Tracer):
        low, high = int(jnp.min(array)), int(jnp.max(array))
        if low < 0 or high >= spec.vocab_size:
            raise ValueError(
                f"inputs: {spec.name} ids must be in [0, {spec.vocab_size}) (the {spec.name} "
                f"vocabulary), got values in [{low}, {high}]"
            )
    return array, _check_lengths(spec, array, prompt_lengths)


def _check_lengths(spec, inputs, prompt_lengths) -> Array | None:
    if prompt_lengths is None:
        return None
    if spec.needs_start_id:
        raise ValueError(
            f"prompt_lengths is for decoder-only LMs; a {spec.name} is right-padded with pad_id="
            f"{spec.pad_id} and its padding is masked"
        )
    lengths = np.asarray(prompt_lengths)
    batch, width = inputs.shape
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(
            f"prompt_lengths must be {batch} ints (one per prompt), got {lengths.dtype} "
            f"of shape {lengths.shape}"
        )
    if lengths.min() < 1 or lengths.max() > width:
        raise ValueError(
            f"prompt_lengths must be in [1, {width}] (the padded prompt width), got values in "
            f"[{lengths.min()}, {lengths.max()}]"
        )
    if (lengths == width).all():
        return None  # not ragged: every row at the same positions
    return jnp.asarray(lengths, jnp.int32)


def check_for_family(
    spec: InputSpec, start_id, *, return_attention: bool = False, target_prefix=None
) -> None:
    """The options that a model family takes or needs (its ``InputSpec``): ``generate``'s and
    the serving engine's."""
    if not spec.needs_start_id and return_attention:
        raise ValueError("a decoder-only LM has no source to return attention over")
    if spec.needs_start_id and start_id is None:
        raise ValueError(f"a model with a {spec.name} needs start_id (the target's start token)")
    if target_prefix is not None and not spec.needs_start_id:
        raise ValueError(
            f"target_prefix is for encoder-decoder models; a decoder-only LM's {spec.name} already "
            "forces its tokens (append the prefix to the prompt)"
        )


def _check_positions(adapter: Adapter, input_length: int, max_length: int) -> None:
    """``max_length`` (checked) against the positions the model has after the inputs."""
    spec = adapter.inputs
    positions = adapter.positions(input_length, max_length)
    if positions > spec.max_len:
        allowed = spec.max_len - positions + max_length
        raise ValueError(
            f"max_length={max_length} needs {positions} positions, more than the model's "
            f"max_len={spec.max_len}; allowed here: max_length <= {allowed}"
        )
