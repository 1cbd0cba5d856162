"""``dynamic_decode``: greedy, sampling and beam search for any step function, in one ``lax.scan``.

The order of operations at each step is OpenNMT-tf 2.32's (``opennmt.utils.decoding``):

1. ``logits, state[, attention] = step_fn(ids, step, state[, shared])``; logits cast to float32.
2. ``suppress_ids`` logits -inf (when given). Before ``min_length``: EOS logit -1e7. Otherwise
   finished rows are forced to EOS with log-prob 0.
3. ``log_probs = log_softmax(logits)``; the strategy picks words, parent beams and new scores
   (during a target prefix, the pick is replaced by the prefix's token: see below).
4. Lengths grow for unfinished rows; lengths, finished flags, accumulators and the model state are
   gathered by the parent rows (``state.reorder``); ``finished |= word == end_id``.

What happens at steps 2-4 (the ``end_id`` tuples, the freezing of finished entries, forced
prefixes) is ``search_step.py``'s story.

The loop has a static length (``max_length`` steps) and OpenNMT-tf's stopping rule: once every row
has finished, the remaining steps change nothing (the search state and the records of such a step
are selected as they were, leaf by leaf; a ``lax.cond`` instead made XLA copy every KV cache twice a
step). By default the steps run in chunks of ``chunk_size`` (8) scan steps inside a
``lax.while_loop``, which leaves at the first chunk boundary after every row has finished; the last
chunk may reach past ``max_length``: those steps are idle, so one loop body serves every length and
the step function is compiled once. ``chunk_size=None`` runs all ``max_length`` steps in one scan.

One step is two functions: the model's step, then ``search_step`` (everything from 2. on, for all
rows, given the step's logits and attention), which returns the parent row of every row so that the
caller reorders the model state. ``dynamic_decode`` calls them in turn; the serving engine
(``jaxformer.serving``) runs the model step once over all its slots and ``search_step`` under
``jax.vmap`` over its requests. The options a step reads as data (``SearchData``: the strategy's
penalties, the sampler's temperature and top-p, ``min_length``) are Python numbers when
``dynamic_decode`` is called with them, and traced scalars when ``generate`` or the engine passes
them: the same code either way (a number 0 skips its arithmetic; as data, a 0 leaves the scores
as they are, bit for bit).

The step function is traced once: the loop wraps it in ``jax.jit``, so the trace that
``jax.eval_shape`` makes to check its outputs against the rows and the options is the one the loop
body reuses (for the ``base`` preset that saves about half a second of a first call's tracing).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.decoding import options as opt
from jaxformer.decoding import repetition
from jaxformer.decoding.options import COMPAT_MODES
from jaxformer.decoding.result import DecodingResult, finalize
from jaxformer.decoding.samplers import BestSampler
from jaxformer.decoding.search_step import (
    EOS_PENALTY,
    Search,
    SearchData,
    SearchState,
    StepRecord,
    search_step,
)
from jaxformer.decoding.state import check_batch_axis, reorder, tile_batch
from jaxformer.decoding.stop import StopTable
from jaxformer.decoding.strategies import BeamSearch, GreedySearch
from jaxformer.typing import Array, Int, PRNGKey, PyTree

__all__ = [
    "COMPAT_MODES",
    "EOS_PENALTY",
    "Search",
    "SearchData",
    "SearchState",
    "StepRecord",
    "dynamic_decode",
    "run_search",
    "search_step",
]


def dynamic_decode(
    step_fn,
    start_ids: Int[Array | np.ndarray, " B"],
    end_id: int | tuple[int, ...],
    initial_state: PyTree = None,
    strategy: GreedySearch | BeamSearch = GreedySearch(),
    sampler: Any = BestSampler(),
    max_length: int = 250,
    min_length: int | Int[Array, ""] = 0,
    rng: PRNGKey | None = None,
    attention_size: int | None = None,
    return_attention: bool = False,
    compat: str | None = None,
    chunk_size: int | None = 8,
    trace: bool = False,
    shared: PyTree = None,
    target_prefix: Int[Array | np.ndarray, "_B P"] | list | None = None,
    suppress_ids: tuple[int, ...] | list[int] = (),
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    context: tuple | None = None,
    stop: StopTable | None = None,
) -> DecodingResult:
    """Decode with ``step_fn(ids [R], step, state[, shared]) -> (logits [R, V], state[, attention [R, S]])``.

    The contract of ``step_fn`` (docs/search.md, "The step-function contract", has it in full): ``ids``
    int32[R] is the token each row emitted last (``start_ids`` repeated W times at step 0), R = B*W
    rows laid out [b0w0, b0w1, ..., b1w0, ...]; ``step`` is a traced int32 scalar; ``state`` is
    ``initial_state`` tiled to R rows and reordered by the beams after every step (scalar leaves are
    left as they are; a node implementing ``tile_beams`` / ``reorder_beams`` answers for itself: see
    ``jaxformer.decoding.state``). It returns raw ``logits`` [R, V] (the search applies log_softmax,
    in float32), the state with the same structure, shapes and dtypes, and optionally ``attention``
    [R, S], required by ``coverage_penalty`` and ``return_attention``. It is traced once (the shape
    probe's trace serves the loop body) and run inside the loop: pure, static shapes. Finished rows are still
    passed to it; their outputs are ignored (EOS is forced). ``shared`` (when not None) is passed to
    every step as its fourth argument and never tiled nor reordered: per-entry data such as the
    encoder memory, which the W rows of an entry read.
    ``compat="opennmt-tf"`` reproduces OpenNMT-tf 2.32's returned values exactly, defects included;
    the default corrects them (every returned field describes the same hypothesis; log_probs travel
    with their hypothesis; each token's attention comes from the row that generated it).
    ``chunk_size`` steps run between two checks for the early exit (None: no early exit, one scan);
    ``trace`` returns the per-step tensors of the OpenNMT-tf article in ``result.trace``.
    ``target_prefix`` int32 [B, P] (P < ``max_length``; None or P = 0: none) forces the first P
    tokens of every hypothesis of entry b to ``target_prefix[b]`` (see "Forced prefixes" in the
    module docstring); its values are data, its length is static. ``suppress_ids`` (a tuple of
    token ids, never ``end_id``) get a -inf logit at every step, before the log-softmax.
    ``repetition_penalty`` (CTRL's θ, 1: off) and ``no_repeat_ngram_size`` (0: off) look at each
    row's history: ``context`` ``(int32[B, C], lengths int32[B])``, the tokens before the first
    generated one (an LM's whole prompt; default: the start ids), then what the row generated
    (``repetition.py`` has the formulas). ``stop`` (a ``stop.StopTable`` of stop strings) ends a
    hypothesis at the first token that completes one of them.
    It runs eagerly or inside ``jax.jit``. The strategy's penalties, the sampler's temperature and
    top-p, ``min_length`` and the prefix's ids may be traced (data, see ``SearchData``); every
    other option is static.
    """
    options = opt.check_search(
        strategy, sampler, end_id=end_id, max_length=max_length, min_length=min_length,
        compat=compat, rng=rng, chunk_size=chunk_size, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, suppress_ids=suppress_ids,
        target_prefix=target_prefix,
    )  # fmt: skip
    return run_search(
        step_fn, start_ids, initial_state, options, attention_size=attention_size,
        return_attention=return_attention, trace=trace, shared=shared, context=context, stop=stop,
    )  # fmt: skip


def run_search(
    step_fn,
    start_ids: Int[Array | np.ndarray, " B"],
    initial_state: PyTree,
    options: opt.SearchOptions,
    *,
    attention_size: int | None = None,
    return_attention: bool = False,
    trace: bool = False,
    shared: PyTree = None,
    context: tuple | None = None,
    stop: StopTable | None = None,
) -> DecodingResult:
    """``dynamic_decode`` with options already checked (``opt.check_search``; ``generate`` also
    checked them against its model's vocabulary). What has not been checked against the step
    function's vocabulary V (``options.vocab`` None or another V) is checked here: V is known
    once the step function is traced."""
    strategy = options.strategy
    if strategy.uses_coverage and attention_size is None:
        raise ValueError("coverage_penalty needs attention_size (the source length S)")
    start_ids = _check_start_ids(start_ids)
    check_batch_axis(initial_state, start_ids.shape[0])
    step = jax.jit(_with_shared(step_fn, shared))  # traced once: the probe's trace is reused
    initial = _initial_search_state(
        start_ids, initial_state, options, attention_size, context, stop
    )
    wants_attention = return_attention or strategy.uses_coverage
    vocab, attention_width = _probe(step, initial, strategy.width, attention_size, wants_attention)
    batch = start_ids.shape[0]
    if options.vocab != vocab:  # here, not in check_search: V is the traced step function's
        options = opt.checked_against(options, vocab=vocab, batch=batch, stop=stop)
    search = _settings(options, batch, attention_width, return_attention, trace)
    data = SearchData(strategy, options.sampler, options.min_length)
    body = _loop_body(step, search, data, options.target_prefix, stop)
    if options.chunk_size is None:
        steps = jnp.arange(search.max_length, dtype=jnp.int32)
        final, records = jax.lax.scan(body, initial, steps)
    else:
        final, records = _chunked_loop(body, initial, search, options.chunk_size)
    return finalize(records, final, search)


def _check_start_ids(start_ids) -> Array:
    shape = np.shape(start_ids)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"start_ids must be int32[B] (one start token per row), got shape {shape}")
    return jnp.asarray(start_ids, jnp.int32)


def _with_shared(step_fn, shared):
    """``step_fn`` as ``(ids, step, state) -> (logits, state, attention | None)``."""

    def step(ids, t, state):
        outputs = step_fn(ids, t, state) if shared is None else step_fn(ids, t, state, shared)
        if not isinstance(outputs, tuple) or len(outputs) not in (2, 3):
            raise TypeError("step_fn must return (logits, state) or (logits, state, attention)")
        return outputs if len(outputs) == 3 else (*outputs, None)

    return step


def _initial_search_state(
    start_ids, initial_state, options: opt.SearchOptions, attention_size, context, stop
) -> SearchState:
    strategy = options.strategy
    batch, width = start_ids.shape[0], strategy.width
    rows = batch * width
    history = filled = None
    if options.repetition_penalty != 1.0 or options.no_repeat_ngram_size:
        if context is None:  # the start ids
            context = (start_ids[:, None], jnp.ones_like(start_ids))
        history, filled = repetition.initial_history(*context, width, options.max_length)
    return SearchState(
        ids=jnp.repeat(start_ids, width),  # [R]
        finished=jnp.zeros([rows], bool),
        lengths=jnp.zeros([rows], jnp.int32),
        cum_log_probs=strategy.initial_log_probs(batch),  # [R]: [0, -inf, ...] per entry
        scores=strategy.initial_log_probs(batch),
        accumulated_attention=(
            jnp.zeros([rows, attention_size], jnp.float32) if strategy.uses_coverage else None
        ),
        model_state=tile_batch(initial_state, width),
        rng=options.rng,
        history=history,  # [R, C + max_length]
        filled=filled,  # [R]
        stop_state=None if stop is None else jnp.zeros([rows], jnp.int32),
    )


def _probe(step, initial: SearchState, width, attention_size, wants_attention) -> tuple[int, int]:
    """The step's output shapes (traced, not run), checked against the rows and the options: the
    vocabulary V, and the width S of the attention (0 without; checked when the search needs it)."""
    rows, batch = initial.ids.shape[0], initial.ids.shape[0] // width
    logits, state, attention = jax.eval_shape(step, initial.ids, jnp.int32(0), initial.model_state)
    if len(logits.shape) != 2 or logits.shape[0] != rows:
        raise ValueError(
            f"step_fn returned logits of shape {logits.shape}; expected [{rows}, V] "
            f"(one row per search row: batch {batch} x beam width {width})"
        )
    expected = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), initial.model_state)
    returned = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    if jax.tree.structure(expected) != jax.tree.structure(returned) or expected != returned:
        raise ValueError(
            "step_fn must return a state of the same structure, shapes and dtypes as it was "
            f"given; got {jax.tree.structure(returned)} for {jax.tree.structure(expected)}"
        )
    vocab = logits.shape[1]
    if not isinstance(initial.ids, jax.core.Tracer):  # concrete ids can be checked before running
        low, high = int(jnp.min(initial.ids)), int(jnp.max(initial.ids))
        if low < 0 or high >= vocab:
            raise ValueError(f"start_ids must be in [0, {vocab}), got values in [{low}, {high}]")
    if wants_attention:
        _check_attention(attention, rows, attention_size)
    return vocab, 0 if attention is None else attention.shape[-1]


def _check_attention(attention, rows: int, attention_size: int | None) -> None:
    if attention is None:
        raise ValueError(
            "return_attention / coverage_penalty need a step_fn that returns attention"
        )
    if attention.shape[0] != rows or len(attention.shape) != 2:
        raise ValueError(
            f"step_fn returned attention of shape {attention.shape}; expected [{rows}, S]"
        )
    if attention_size is not None and attention.shape[-1] != attention_size:
        raise ValueError(
            f"attention_size={attention_size} does not match the step function's attention "
            f"width {attention.shape[-1]}"
        )


def _settings(
    options: opt.SearchOptions, batch: int, attention_width: int, return_attention, trace
) -> Search:
    """The static settings of the search (``options`` checked against its vocabulary)."""
    end_id, prefix = options.end_id, options.target_prefix
    return Search(
        strategy=options.strategy,
        sampler=options.sampler,
        end_ids=end_id if isinstance(end_id, tuple) else (end_id,),
        batch=batch,
        vocab=options.vocab,
        max_length=options.max_length,
        compat=options.compat,
        return_attention=return_attention,
        trace=trace,
        attention_width=attention_width,
        suppress_ids=options.suppress_ids,
        prefix_length=0 if prefix is None else prefix.shape[1],
        repetition_penalty=options.repetition_penalty,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
    )


def _loop_body(step, search: Search, data: SearchData, prefix=None, stop=None):
    """One step of the loop: ``_advance``, or nothing once every row has finished, leaf by leaf.

    The model step always runs and its state is kept: once every row has finished nothing reads that
    state again. Everything else is selected, so an idle step leaves the search as it was and
    records "EOS, same beam". Steps at or past ``max_length`` (the end of the last chunk) are idle.
    """

    def body(state: SearchState, t) -> tuple[SearchState, StepRecord]:
        idle = jnp.all(state.finished) | (t >= search.max_length)
        t = jnp.minimum(t, search.max_length - 1)
        new, record = _advance(step, search, state, t, data, prefix, stop)
        keep = lambda old, ran: jax.tree.map(lambda a, b: jnp.where(idle, a, b), old, ran)
        aside = dict(model_state=None, rng=None)  # the model state is not selected; rng is fixed
        picked = keep(state.replace(**aside), new.replace(**aside))
        picked = picked.replace(model_state=new.model_state, rng=state.rng)
        return picked, keep(_idle_record(record, search), record)

    return body


def _advance(
    step, search: Search, state: SearchState, t, data: SearchData, prefix=None, stop=None
) -> tuple[SearchState, StepRecord]:
    """Steps 1-4 of the module docstring for every row: the model step, then ``search_step``,
    then the model state reordered by the parent rows."""
    logits, model_state, attention = step(state.ids, t, state.model_state)
    new, record, parents = search_step(search, state, logits, attention, t, data, prefix, stop)
    model_state = model_state if search.width == 1 else reorder(model_state, parents)
    return new.replace(model_state=model_state), record


def _idle_record(record: StepRecord, search: Search) -> StepRecord:
    """What a step records once every row has finished: EOS from the same beam, zeros elsewhere."""
    return jax.tree.map(jnp.zeros_like, record)._replace(
        word_ids=jnp.full([search.rows], search.end_id, jnp.int32),
        beam_ids=jnp.arange(search.rows, dtype=jnp.int32) % search.width,
        ran=jnp.bool_(False),
    )


def _record_like(body, initial: SearchState, search: Search) -> StepRecord:
    """A record of the loop's shapes and dtypes (the teaching trace's by tracing the body)."""
    if search.trace:
        shapes = jax.eval_shape(lambda s: body(s, jnp.int32(0))[1], initial)
        return jax.tree.map(lambda r: jnp.zeros(r.shape, r.dtype), shapes)
    rows = jnp.zeros([search.rows], jnp.int32)
    attention = None
    if search.return_attention:
        attention = jnp.zeros([search.rows, search.attention_width], jnp.float32)
    return StepRecord(rows, rows, jnp.bool_(False), attention, None)


def _chunked_loop(body, initial: SearchState, search: Search, chunk_size: int):
    """A ``while_loop`` over chunks of ``chunk_size`` scan steps that stops once every row finished.

    ``ceil(max_length / chunk_size)`` chunks; steps past ``max_length`` in the last one are idle and
    their records are cut off. Gives the records of the plain scan: the steps it never runs hold the
    idle record.
    """
    chunk_size = min(chunk_size, search.max_length)
    num_chunks = -(-search.max_length // chunk_size)
    padded = num_chunks * chunk_size
    steps = jnp.arange(padded, dtype=jnp.int32)
    fill = _idle_record(_record_like(body, initial, search), search)
    empty = jax.tree.map(lambda f: jnp.broadcast_to(f, (padded, *f.shape)), fill)

    def more(carry):
        chunk, state, _ = carry
        return (chunk < num_chunks) & ~jnp.all(state.finished)

    def chunk_body(carry):
        chunk, state, records = carry
        start = chunk * chunk_size
        state, new = jax.lax.scan(
            body, state, jax.lax.dynamic_slice_in_dim(steps, start, chunk_size)
        )
        put = lambda r, n: jax.lax.dynamic_update_slice_in_dim(r, n, start, 0)
        return chunk + 1, state, jax.tree.map(put, records, new)

    _, final, records = jax.lax.while_loop(more, chunk_body, (jnp.int32(0), initial, empty))
    return final, jax.tree.map(lambda r: r[: search.max_length], records)
