"""``dynamic_decode``: greedy, sampling and beam search for any step function, in one ``lax.scan``.

The order of operations at each step is OpenNMT-tf 2.32's (``opennmt.utils.decoding``):

1. ``logits, state[, attention] = step_fn(ids, step, state[, shared])``; logits cast to float32.
2. ``suppress_ids`` logits -inf (when given). Before ``min_length``: EOS logit -1e7. Otherwise
   finished rows are forced to EOS with log-prob 0.
3. ``log_probs = log_softmax(logits)``; the strategy picks words, parent beams and new scores
   (during a target prefix, the pick is replaced by the prefix's token: see below).
4. Lengths grow for unfinished rows; lengths, finished flags, accumulators and the model state are
   gathered by the parent rows (``state.reorder``); ``finished |= word == end_id``.

``end_id`` may be a tuple of ids (Llama 3 ends on any of three): any of them ends a hypothesis, every
one of them is held back before ``min_length``, and a finished row is forced to emit the first.

By default (not in compat mode), after the pick (3.) a batch entry whose hypotheses had all finished
is frozen: it emits EOS from its own rows and keeps its log-probs, scores and coverage accumulator, as
it would if it were decoded alone (the loop idles once every row has finished). So a row's result does
not depend on the other entries of its batch. ``compat="opennmt-tf"`` keeps OpenNMT-tf's behaviour,
which re-scores such an entry for as long as other entries run: the step after a hypothesis's EOS,
its length penalty counts the EOS and its coverage penalty starts, so its score, and the order of the
entry's beams, depend on the batch.

Forced prefixes (``target_prefix`` int32 [B, P], beyond OpenNMT-tf; CTranslate2's ``target_prefix``,
Hugging Face's ``forced_bos_token_id`` / ``forced_decoder_ids`` for P = 1 / a prefix): at steps
t < P every row of entry b emits ``target_prefix[b, t]`` whatever the model predicts; its own row
continues (no reorder), so beams that start at -inf stay at -inf until the prefix ends and step P
expands the single live beam as step 0 does without a prefix: the W hypotheses share the prefix
and are distinct. A forced token adds 0 to ``log_probs`` and ``scores``, as in Hugging Face (its
forced-token logits processors leave the forced token the only candidate, log-prob 0) and
CTranslate2 (``update_sample_with_prefix`` sets the score of a prefix step to 0): both are the
cumulative log-probability of the tokens the search chose, given the prefix. The prefix's tokens
are part of ``ids`` and count in ``lengths`` and in the length penalty; ``max_length`` and
``min_length`` count from the first token, prefix included (CTranslate2 with its default
``return_prefix=True``), so ``min_length <= P`` adds nothing. ``suppress_ids`` do not apply to
forced tokens (CTranslate2 forces its prefix after suppressing too).

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

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxformer.decoding import options as opt
from jaxformer.decoding import repetition
from jaxformer.decoding.gather_tree import is_end
from jaxformer.decoding.options import COMPAT_MODES
from jaxformer.decoding.result import DecodingResult, finalize
from jaxformer.decoding.samplers import BestSampler
from jaxformer.decoding.state import check_batch_axis, reorder, tile_batch
from jaxformer.decoding.stop import StopTable
from jaxformer.decoding.strategies import BeamSearch, GreedySearch
from jaxformer.typing import Array, Bool, Float, Int, PRNGKey, PyTree

EOS_PENALTY = -1e7  # added to the EOS logit before min_length, as OpenNMT-tf does
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


@struct.dataclass
class SearchState:
    """The loop carry. Every field has the search rows (R = B*W) first."""

    # Fields are annotated Any (with shape comments): pytree leaves are not always arrays.
    ids: Any  # int32[R] last emitted token of each row (the next step's input)
    finished: Any  # bool[R]
    lengths: Any  # int32[R] tokens generated, EOS included; frozen once finished
    cum_log_probs: Any  # float32[R]
    scores: Any  # float32[R] ranking score of the row's hypothesis at its last pick
    accumulated_attention: Any  # float32[R, S] coverage-penalty accumulator, or None
    model_state: Any  # the step function's state (KV cache), reordered with the beams
    rng: Any  # PRNG key or None
    history: Any = None  # int32[R, C + max_length] context + generated tokens (repetition.py)
    filled: Any = None  # int32[R] tokens in ``history``
    stop_state: Any = None  # int32[R] the stop strings' automaton state (stop.py), or None


class StepRecord(NamedTuple):
    """What one step leaves behind (stacked by the scan to ``[T, ...]``)."""

    word_ids: Int[Array, " R"]
    beam_ids: Int[Array, " R"]  # parent pointers for backtracking
    ran: Bool[Array, ""]  # False for the steps skipped after every row had finished
    attention: Float[Array, "R S"] | None  # see `_advance`
    trace: dict | None  # the teaching trace (``trace=True``)


@struct.dataclass
class SearchData:
    """The options a step reads as data: each a Python number or a traced scalar.

    The static parts (beam width, top-k, whether coverage or a nucleus is on) are in the pytree
    structure of ``strategy`` and ``sampler``; their leaves are the penalties, the temperature and
    ``top_p``. The engine holds one per request, stacked, and vmaps ``search_step`` over them.
    """

    strategy: Any  # GreedySearch / BeamSearch (length_penalty, coverage_penalty)
    sampler: Any  # BestSampler / RandomSampler (temperature, top_p)
    min_length: Any = 0  # int or int32[]: EOS is held back at steps t < min_length


@dataclasses.dataclass(frozen=True)
class Search:
    """The static settings of one search (everything but arrays; ``SearchData`` has the rest)."""

    strategy: GreedySearch | BeamSearch  # its static parts: width, num_hypotheses, coverage
    sampler: Any
    end_ids: tuple[int, ...]  # any of them ends a hypothesis; the first is forced after the end
    batch: int
    vocab: int
    max_length: int
    compat: str | None
    return_attention: bool
    trace: bool
    attention_width: int  # S of the step's attention (0 when it is not used)
    suppress_ids: tuple[int, ...] = ()  # tokens whose logits are -inf at every step
    prefix_length: int = 0  # P: steps 0 .. P-1 emit the target prefix
    repetition_penalty: float = 1.0  # CTRL's, on the tokens of the history (repetition.py)
    no_repeat_ngram_size: int = 0  # no n-gram of the history twice (0: off)

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    @property
    def end_id(self) -> int:
        """The id forced on finished rows and written after a hypothesis's end."""
        return self.end_ids[0]

    @property
    def width(self) -> int:
        return self.strategy.width

    @property
    def rows(self) -> int:
        return self.batch * self.strategy.width

    @property
    def wants_attention(self) -> bool:
        return self.return_attention or self.strategy.uses_coverage


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


def search_step(
    search: Search,
    state: SearchState,
    logits: Float[Array, "R V"],
    attention: Float[Array, "R S"] | None,
    t: Int[Array, ""],
    data: SearchData,
    prefix: Int[Array, "B P"] | None = None,
    stop: StopTable | None = None,
) -> tuple[SearchState, StepRecord, Int[Array, " R"]]:
    """Steps 2-4 of the module docstring for every row, given the model step's outputs.

    Pure and model-free: returns the new search state (its ``model_state`` None: the caller reorders
    its own), the step's record and the parent row of every row (``[R]``, within each batch
    entry). ``search`` is static; ``data`` holds the options read as data (the strategy and
    sampler used here are ``data``'s); ``prefix``: int32[B, P] or None; ``stop``: a
    ``StopTable`` or None.
    """
    logits = _masked_logits(search, state, logits)  # [R, V]
    attention = attention.astype(jnp.float32) if search.wants_attention else None  # [R, S]
    log_probs = _log_probs(search, state, logits, t, data.min_length)  # [R, V]
    rng = None if state.rng is None else jax.random.fold_in(state.rng, t)
    sel = data.strategy.select(log_probs, state, attention, data.sampler, rng)
    if not search.compat:
        sel = _freeze_finished_entries(sel, state, search)
    if prefix is not None:
        sel = _force_prefix(sel, state, search, prefix, t)
    parents = sel.beam_indices  # [R]
    new = _next_state(search, state, sel, stop)
    record_attention = None
    if search.return_attention:
        # Default: the attention of the row that generated each token (the parent row).
        # OpenNMT-tf stacks the attention in the row order from before the reorder.
        record_attention = attention if search.compat else attention[parents]
    trace = _trace(log_probs, sel, new) if search.trace else None
    record = StepRecord(sel.word_ids, sel.beam_ids, jnp.bool_(True), record_attention, trace)
    return new, record, parents


def _masked_logits(search: Search, state: SearchState, logits) -> Float[Array, "R V"]:
    """The step's logits in float32, after the repetition options and ``suppress_ids``."""
    logits = logits.astype(jnp.float32)  # [R, V]
    if search.uses_history:
        logits = repetition.apply(
            logits, state.history, state.filled, repetition_penalty=search.repetition_penalty,
            no_repeat_ngram_size=search.no_repeat_ngram_size,
        )  # fmt: skip
    if search.suppress_ids:
        suppressed = np.zeros([1, search.vocab], bool)  # [1, V]
        suppressed[0, list(search.suppress_ids)] = True
        logits = jnp.where(suppressed, -jnp.inf, logits)  # [R, V]
    return logits


def _log_probs(search: Search, state: SearchState, logits, t, min_length) -> Float[Array, "R V"]:
    """Step 2's end ids, then the log-softmax: every end id held back before ``min_length``
    (``EOS_PENALTY``); from then on a finished row emits the first end id at no cost."""
    eos = np.zeros([1, search.vocab], np.float32)  # [1, V]: 1 at every end id
    eos[0, list(search.end_ids)] = 1.0
    first = jax.nn.one_hot(search.end_id, search.vocab, dtype=jnp.float32)[None]  # [1, V]
    forced = jnp.where(first > 0, 0.0, -jnp.inf)  # [1, V] log-probs of a forced EOS
    early = t < min_length
    log_probs = jax.nn.log_softmax(jnp.where(early, logits + EOS_PENALTY * eos, logits), axis=-1)
    return jnp.where(~early & state.finished[:, None], forced, log_probs)  # [R, V]


def _next_state(search: Search, state: SearchState, sel, stop) -> SearchState:
    """Step 4: the rows after the pick ``sel``, gathered by their parent rows (``model_state``
    None: the caller reorders its own)."""
    parents = sel.beam_indices  # [R]
    grown = jnp.where(state.finished, state.lengths, state.lengths + 1)  # [R]
    parent_finished = state.finished[parents]  # [R]
    # A finished hypothesis keeps its log-prob. OpenNMT-tf keeps the *row's* old value, so the
    # log-prob does not travel with a finished hypothesis that changes rows (its defect 1); by
    # default it travels with the hypothesis (the parent row's value).
    frozen = state.cum_log_probs if search.compat else state.cum_log_probs[parents]
    accumulated = sel.accumulated_attention
    finished = parent_finished | is_end(sel.word_ids, search.end_ids)
    stop_state = None
    if stop is not None:  # the token from the parent's automaton state (stop.py)
        reading = state.stop_state[parents]  # [R]
        stop_state = stop.transition[reading, sel.word_ids]
        finished = finished | stop.hit[reading, sel.word_ids]
    history = filled = None
    if search.uses_history:
        history, filled = repetition.append(
            state.history[parents], state.filled[parents], sel.word_ids
        )
    return SearchState(
        ids=sel.word_ids,
        finished=finished,
        lengths=grown[parents],
        cum_log_probs=jnp.where(parent_finished, frozen, sel.cum_log_probs),
        scores=sel.scores,
        accumulated_attention=None if accumulated is None else accumulated[parents],
        model_state=None,
        rng=state.rng,
        history=history,
        filled=filled,
        stop_state=stop_state,
    )


def _trace(log_probs, sel, new: SearchState) -> dict:
    """The per-step tensors of the OpenNMT-tf article, under its names."""
    return dict(
        log_probs=log_probs,
        total_probs=sel.total_probs,
        scores=sel.penalised,
        sample_scores=sel.scores,
        word_ids=sel.word_ids,
        beam_ids=sel.beam_ids,
        beam_indices=sel.beam_indices,
        cum_log_probs=new.cum_log_probs,
        finished=new.finished,
        sequence_lengths=new.lengths,
        accumulated_attention=new.accumulated_attention,
    )


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


def _freeze_finished_entries(sel, state: SearchState, search: Search):
    """The selection with every batch entry whose hypotheses had all finished left as it was.

    Such an entry emits EOS from its own rows and keeps its log-probs, scores and coverage
    accumulator, exactly as it would alone (the loop idles once every row has finished). Without this,
    its finished hypotheses would be re-scored for as long as *other* entries run (the step after EOS,
    the length penalty counts the EOS and the coverage penalty, which only counts hypotheses finished
    before the step, starts; re-scored beams may swap places): the batch would change the result.
    OpenNMT-tf has that dependence; compat mode keeps it.
    """
    batch, width = search.batch, search.width
    done = jnp.repeat(jnp.all(state.finished.reshape(batch, width), axis=1), width)  # [R]
    own = jnp.arange(search.rows, dtype=jnp.int32)  # [R]
    accumulated = sel.accumulated_attention
    if accumulated is not None:
        accumulated = jnp.where(done[:, None], state.accumulated_attention, accumulated)  # [R, S]
    return sel._replace(
        word_ids=jnp.where(done, search.end_id, sel.word_ids),
        beam_ids=jnp.where(done, own % width, sel.beam_ids),
        beam_indices=jnp.where(done, own, sel.beam_indices),
        cum_log_probs=jnp.where(done, state.cum_log_probs, sel.cum_log_probs),
        scores=jnp.where(done, state.scores, sel.scores),
        accumulated_attention=accumulated,
    )


def _force_prefix(sel, state: SearchState, search: Search, prefix, t):
    """The selection with every row emitting ``prefix[b, t]`` from its own row while ``t < P``.

    A forced step adds nothing to the log-probs and scores (as Hugging Face's forced-token logits
    processors and CTranslate2's ``target_prefix`` do) and reorders nothing: the beams that start at
    -inf (``BeamSearch.initial_log_probs``) stay there, so step P expands the one live beam as step
    0 does without a prefix, and the W hypotheses are distinct. The coverage accumulator keeps the
    forced steps' attention (each row's own).
    """
    forced = t < search.prefix_length
    token = prefix[:, jnp.minimum(t, search.prefix_length - 1)]  # [B]
    token = jnp.repeat(token, search.width)  # [B] -> [R]
    own = jnp.arange(search.rows, dtype=jnp.int32)  # [R]
    return sel._replace(
        word_ids=jnp.where(forced, token, sel.word_ids),
        beam_ids=jnp.where(forced, own % search.width, sel.beam_ids),
        beam_indices=jnp.where(forced, own, sel.beam_indices),
        cum_log_probs=jnp.where(forced, state.cum_log_probs, sel.cum_log_probs),
        scores=jnp.where(forced, state.scores, sel.scores),
    )


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
