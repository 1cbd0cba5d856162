"""One step of the search for every row, given the model step's logits: ``search_step`` (steps 2-4
of ``loop.py``'s docstring, in OpenNMT-tf 2.32's order), and the search's state and settings.

2. ``suppress_ids`` logits -inf (when given). Before ``min_length``: EOS logit -1e7. Otherwise
   finished rows are forced to EOS with log-prob 0.
3. ``log_probs = log_softmax(logits)``; the strategy picks words, parent beams and new scores
   (during a target prefix, the pick is replaced by the prefix's token: see below).
4. Lengths grow for unfinished rows; lengths, finished flags and accumulators are gathered by the
   parent rows (the caller reorders its model state by the parents returned);
   ``finished |= word == end_id``.

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
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxformer.decoding import repetition
from jaxformer.decoding.gather_tree import is_end
from jaxformer.decoding.stop import StopTable
from jaxformer.decoding.strategies import BeamSearch, GreedySearch
from jaxformer.typing import Array, Bool, Float, Int

EOS_PENALTY = -1e7  # added to the EOS logit before min_length, as OpenNMT-tf does
__all__ = ["EOS_PENALTY", "Search", "SearchData", "SearchState", "StepRecord", "search_step"]


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
