"""``dynamic_decode``: greedy, sampling and beam search for any step function, in one ``lax.scan``.

The order of operations at each step is OpenNMT-tf 2.32's (``opennmt.utils.decoding``):

1. ``logits, state[, attention] = step_fn(ids, step, state)``; logits cast to float32.
2. Before ``min_length``: EOS logit -1e7. Otherwise finished rows are forced to EOS with log-prob 0.
3. ``log_probs = log_softmax(logits)``; the strategy picks words, parent beams and new scores.
4. Lengths grow for unfinished rows; lengths, finished flags, accumulators and the model state are
   gathered by the parent rows; ``finished |= word == end_id``.

By default (not in compat mode), after the pick (3.) a batch entry whose hypotheses had all finished
is frozen: it emits EOS from its own rows and keeps its log-probs, scores and coverage accumulator, as
it would if it were decoded alone (the loop idles once every row has finished). So a row's result does
not depend on the other entries of its batch. ``compat="opennmt-tf"`` keeps OpenNMT-tf's behaviour,
which re-scores such an entry for as long as other entries run: the step after a hypothesis's EOS,
its length penalty counts the EOS and its coverage penalty starts, so its score, and the order of the
entry's beams, depend on the batch.

The loop has a static length (``max_length`` steps) and OpenNMT-tf's stopping rule: once every row
has finished, the remaining steps change nothing (the search state and the records of such a step
are selected as they were, leaf by leaf). By default the steps run in chunks of ``chunk_size`` (8)
scan steps inside a ``lax.while_loop``, which leaves the loop at the first chunk boundary after every
row has finished; ``chunk_size=None`` runs all ``max_length`` steps in one ``lax.scan``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxformer.decoding.result import DecodingResult, finalize
from jaxformer.decoding.samplers import BestSampler
from jaxformer.decoding.strategies import BeamSearch, GreedySearch
from jaxformer.models.cache import reorder, tile_batch
from jaxformer.typing import Array, Bool, Float, Int, PRNGKey, PyTree

EOS_PENALTY = -1e7  # added to the EOS logit before min_length, as OpenNMT-tf does
COMPAT_MODES = (None, "opennmt-tf")


@struct.dataclass
class SearchState:
    """The scan carry. Every field has the search rows (R = B*W) first."""

    # Fields are annotated Any (with shape comments): pytree leaves are not always arrays.
    ids: Any  # int32[R] last emitted token of each row (the next step's input)
    finished: Any  # bool[R]
    lengths: Any  # int32[R] tokens generated, EOS included; frozen once finished
    cum_log_probs: Any  # float32[R]
    scores: Any  # float32[R] ranking score of the row's hypothesis at its last pick
    accumulated_attention: Any  # float32[R, S] coverage-penalty accumulator, or None
    model_state: Any  # the step function's state (KV cache), reordered with the beams
    rng: Any  # PRNG key or None


class StepRecord(NamedTuple):
    """What one step leaves behind (stacked by the scan to ``[T, ...]``)."""

    word_ids: Int[Array, " R"]
    beam_ids: Int[Array, " R"]  # parent pointers for backtracking
    ran: Bool[Array, ""]  # False for the steps skipped after every row had finished
    attention: Float[Array, "R S"] | None  # see `_record_attention`
    trace: dict | None  # the teaching trace (``trace=True``)


def _check_args(strategy, sampler, max_length, min_length, compat, rng, attention_size, end_id):
    if not isinstance(strategy, GreedySearch | BeamSearch):
        raise TypeError(f"strategy must be GreedySearch() or BeamSearch(...), got {strategy!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    if not isinstance(min_length, int) or not 0 <= min_length <= max_length:
        raise ValueError(
            f"min_length must be an int in [0, max_length={max_length}], got {min_length!r}"
        )
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    if sampler.needs_rng and rng is None:
        raise ValueError(f"{type(sampler).__name__} needs rng=jax.random.key(...)")
    if strategy.uses_coverage and attention_size is None:
        raise ValueError("coverage_penalty needs attention_size (the source length S)")
    if not isinstance(end_id, int | jnp.integer) or end_id < 0:
        raise ValueError(f"end_id must be a non-negative int, got {end_id!r}")


def _unpack(outputs):
    if not isinstance(outputs, tuple) or len(outputs) not in (2, 3):
        raise TypeError("step_fn must return (logits, state) or (logits, state, attention)")
    return outputs if len(outputs) == 3 else (*outputs, None)


def dynamic_decode(
    step_fn,
    start_ids: Int[Array | np.ndarray, " B"],
    end_id: int,
    initial_state: PyTree = None,
    strategy: GreedySearch | BeamSearch = GreedySearch(),
    sampler: Any = BestSampler(),
    max_length: int = 250,
    min_length: int = 0,
    rng: PRNGKey | None = None,
    attention_size: int | None = None,
    return_attention: bool = False,
    compat: str | None = None,
    chunk_size: int | None = 8,
    trace: bool = False,
) -> DecodingResult:
    """Decode with ``step_fn(ids [R], step, state) -> (logits [R, V], state[, attention [R, S]])``.

    See ``DESIGN.md`` §2 for the contract. ``compat="opennmt-tf"`` reproduces OpenNMT-tf 2.32's returned
    values exactly, defects included; the default corrects them (every returned field describes the same
    hypothesis; log_probs travel with their hypothesis; each token's attention comes from the row that
    generated it). ``chunk_size`` steps run between two checks for the early exit (None: no early exit,
    one scan); ``trace`` returns the per-step tensors of the
    OpenNMT-tf article in ``result.trace``. It runs eagerly or inside ``jax.jit``; every option is static
    except the sampler's temperature, which may be traced.
    """
    _check_args(strategy, sampler, max_length, min_length, compat, rng, attention_size, end_id)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    start_ids = jnp.asarray(start_ids, jnp.int32)
    batch, width = start_ids.shape[0], strategy.width
    rows = batch * width
    want_attention = return_attention or strategy.uses_coverage

    model_state = tile_batch(initial_state, width)
    initial = SearchState(
        ids=jnp.repeat(start_ids, width),
        finished=jnp.zeros([rows], bool),
        lengths=jnp.zeros([rows], jnp.int32),
        cum_log_probs=strategy.initial_log_probs(batch),
        scores=strategy.initial_log_probs(batch),
        accumulated_attention=(
            jnp.zeros([rows, attention_size], jnp.float32) if strategy.uses_coverage else None
        ),
        model_state=model_state,
        rng=rng,
    )

    # The step function's output shapes (traced, not run) for the checks below.
    probe = jax.eval_shape(step_fn, initial.ids, jnp.int32(0), model_state)
    logits_shape, _, attention_shape = _unpack(probe)
    vocab = logits_shape.shape[-1]
    if not 0 <= end_id < vocab:
        raise ValueError(f"end_id={end_id} is outside the vocabulary [0, {vocab})")
    if width > vocab:
        raise ValueError(f"beam_size={width} exceeds the vocabulary size {vocab}")
    if not isinstance(start_ids, jax.core.Tracer):  # concrete ids can be checked before running
        low, high = int(jnp.min(start_ids)), int(jnp.max(start_ids))
        if low < 0 or high >= vocab:
            raise ValueError(f"start_ids must be in [0, {vocab}), got values in [{low}, {high}]")
    if want_attention:
        if attention_shape is None:
            raise ValueError(
                "return_attention / coverage_penalty need a step_fn that returns attention"
            )
        if attention_size is not None and attention_shape.shape[-1] != attention_size:
            raise ValueError(
                f"attention_size={attention_size} does not match the step function's attention "
                f"width {attention_shape.shape[-1]}"
            )
    source_len = attention_shape.shape[-1] if want_attention else 0

    def run(state: SearchState, step) -> tuple[SearchState, StepRecord]:
        logits, model_state, attention = _unpack(step_fn(state.ids, step, state.model_state))
        logits = logits.astype(jnp.float32)  # [R, V]
        attention = (
            None if attention is None or not want_attention else attention.astype(jnp.float32)
        )
        eos = jax.nn.one_hot(end_id, vocab, dtype=jnp.float32)[None]  # [1, V]
        forced = jnp.where(eos > 0, 0.0, -jnp.inf)  # [1, V] log-probs of a forced EOS
        log_probs = jax.nn.log_softmax(
            jnp.where(step < min_length, logits + EOS_PENALTY * eos, logits), axis=-1
        )
        log_probs = jnp.where((step >= min_length) & state.finished[:, None], forced, log_probs)
        rng = None if state.rng is None else jax.random.fold_in(state.rng, step)
        sel = strategy.select(
            log_probs,
            state.cum_log_probs,
            state.finished,
            state.lengths,
            state.accumulated_attention,
            attention,
            sampler,
            rng,
        )
        if not compat:
            sel = _freeze_finished_entries(sel, state, end_id, batch, width)
        grown = jnp.where(state.finished, state.lengths, state.lengths + 1)  # [R]
        parent_finished = state.finished[sel.beam_indices]  # [R]
        # A finished hypothesis keeps its log-prob. OpenNMT-tf keeps the *row's* old value, so the
        # log-prob does not travel with a finished hypothesis that changes rows (its defect 1); by
        # default it travels with the hypothesis (the parent row's value).
        frozen = state.cum_log_probs if compat else state.cum_log_probs[sel.beam_indices]
        cum = jnp.where(parent_finished, frozen, sel.cum_log_probs)
        new_state = SearchState(
            ids=sel.word_ids,
            finished=parent_finished | (sel.word_ids == end_id),
            lengths=grown[sel.beam_indices],
            cum_log_probs=cum,
            scores=sel.scores,
            accumulated_attention=(
                None
                if sel.accumulated_attention is None
                else sel.accumulated_attention[sel.beam_indices]
            ),
            model_state=model_state if width == 1 else reorder(model_state, sel.beam_indices),
            rng=state.rng,
        )
        record_attention = None
        if return_attention:
            # Default: the attention of the row that generated each token (the parent row).
            # OpenNMT-tf stacks the attention in the row order from before the reorder.
            record_attention = attention if compat else attention[sel.beam_indices]
        step_trace = None
        if trace:
            step_trace = dict(
                log_probs=log_probs,
                total_probs=sel.total_probs,
                scores=sel.penalised,
                sample_scores=sel.scores,
                word_ids=sel.word_ids,
                beam_ids=sel.beam_ids,
                beam_indices=sel.beam_indices,
                cum_log_probs=cum,
                finished=new_state.finished,
                sequence_lengths=new_state.lengths,
                accumulated_attention=new_state.accumulated_attention,
            )
        record = StepRecord(
            sel.word_ids, sel.beam_ids, jnp.bool_(True), record_attention, step_trace
        )
        return new_state, record

    record_shapes = jax.eval_shape(lambda s: run(s, jnp.int32(0))[1], initial)

    def idle(state: SearchState, step) -> tuple[SearchState, StepRecord]:
        """Every row has finished: nothing changes; the record says 'EOS, same beam'."""
        record = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), record_shapes)
        record = record._replace(
            word_ids=jnp.full([rows], end_id, jnp.int32),
            beam_ids=jnp.arange(rows, dtype=jnp.int32) % width,
            ran=jnp.bool_(False),
        )
        return state, record

    def body(state, step):
        """``run``, or ``idle`` once every row has finished, chosen leaf by leaf.

        The step always runs and its model state is kept: once every row has finished nothing reads
        that state again. Everything else is selected. (A ``lax.cond`` around the step made XLA copy
        every layer's KV cache twice a step, about 15% of a ``small`` batch-64 step; the chunked
        ``while_loop`` still leaves early.)
        """
        done = jnp.all(state.finished)
        ran_state, ran_record = run(state, step)
        idle_state, idle_record = idle(state, step)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(done, x, y), a, b)
        aside = dict(model_state=None, rng=None)  # the rng key never changes
        picked = pick(idle_state.replace(**aside), ran_state.replace(**aside))
        picked = picked.replace(model_state=ran_state.model_state, rng=state.rng)
        return picked, pick(idle_record, ran_record)

    if chunk_size is None:
        final, records = jax.lax.scan(body, initial, jnp.arange(max_length, dtype=jnp.int32))
    else:
        final, records = _chunked_scan(body, idle, initial, max_length, chunk_size)
    return finalize(
        records, final, strategy, end_id, batch, max_length, source_len, return_attention, compat
    )


def _freeze_finished_entries(sel, state: SearchState, end_id: int, batch: int, width: int):
    """The selection with every batch entry whose hypotheses had all finished left as it was.

    Such an entry emits EOS from its own rows and keeps its log-probs, scores and coverage
    accumulator, exactly as it would alone (the loop idles once every row has finished). Without this,
    its finished hypotheses would be re-scored for as long as *other* entries run (the step after EOS,
    the length penalty counts the EOS and the coverage penalty, which only counts hypotheses finished
    before the step, starts; re-scored beams may swap places): the batch would change the result.
    OpenNMT-tf has that dependence; compat mode keeps it.
    """
    rows = batch * width
    done = jnp.repeat(jnp.all(state.finished.reshape(batch, width), axis=1), width)  # [R]
    own = jnp.arange(rows, dtype=jnp.int32)  # [R]
    accumulated = sel.accumulated_attention
    if accumulated is not None:
        accumulated = jnp.where(done[:, None], state.accumulated_attention, accumulated)  # [R, S]
    return sel._replace(
        word_ids=jnp.where(done, end_id, sel.word_ids),
        beam_ids=jnp.where(done, own % width, sel.beam_ids),
        beam_indices=jnp.where(done, own, sel.beam_indices),
        cum_log_probs=jnp.where(done, state.cum_log_probs, sel.cum_log_probs),
        scores=jnp.where(done, state.scores, sel.scores),
        accumulated_attention=accumulated,
    )


def _chunked_scan(body, idle, initial, max_length: int, chunk_size: int):
    """A ``while_loop`` over chunks of ``chunk_size`` scan steps that stops once every row finished.

    The steps left after the last whole chunk run as one more scan. Gives the records of the plain
    scan: the steps it never runs hold the idle record.
    """
    chunk_size = min(chunk_size, max_length)
    num_chunks, remainder = divmod(max_length, chunk_size)
    steps = jnp.arange(max_length, dtype=jnp.int32)
    _, fill = idle(initial, jnp.int32(0))
    empty = jax.tree.map(lambda f: jnp.broadcast_to(f, (max_length, *f.shape)), fill)

    def cond(carry):
        chunk, state, _ = carry
        return (chunk < num_chunks) & ~jnp.all(state.finished)

    def chunk_body(carry):
        chunk, state, records = carry
        start = chunk * chunk_size
        chunk_steps = jax.lax.dynamic_slice_in_dim(steps, start, chunk_size)
        state, new = jax.lax.scan(body, state, chunk_steps)
        records = jax.tree.map(
            lambda r, n: jax.lax.dynamic_update_slice_in_dim(r, n, start, 0), records, new
        )
        return chunk + 1, state, records

    _, final, records = jax.lax.while_loop(cond, chunk_body, (jnp.int32(0), initial, empty))
    if remainder:
        final, last = jax.lax.scan(body, final, steps[num_chunks * chunk_size :])
        records = jax.tree.map(lambda r, n: r.at[num_chunks * chunk_size :].set(n), records, last)
    return final, records
