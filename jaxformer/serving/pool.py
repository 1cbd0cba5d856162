"""The engine's device side: its slots as fixed-shape pools, and the programs that run on them.

A pool is G groups of W rows (the slots); a request occupies one group. The engine has one pool per
width it serves: W = 1 for greedy search and sampling, W = the beam width for beam search. Every
array has the same shape whatever runs, so each program below compiles once per engine:

- ``admit`` (one compile per input bucket and admission size, a power of two up to G): the
  requests admitted between two chunks, prepared as ``generate`` prepares a batch
  (``adapter.prepare``: the encoder and ``init_memory`` for sources, ``prefill`` for prompts; a
  row's prefill does not depend on the others), tiled to W rows each by the search-state protocol
  (``tile_batch``: fresh ``BeamKVCache`` origin tables), then scattered into the pool at their
  groups. Every leaf of a pool state has a group axis (G entries) or a row axis (G*W rows) first;
  a request's part of a new leaf has 1 or W there, so it goes to rows ``g * 1`` or ``g * W ..``,
  padded with zeros to the pool's trailing shape (a shorter source's memory, its mask False past
  the source). The encoder memory stays one copy per group: the W rows of a beam read it as
  ``generate``'s do (``DecoderStack.step``).
- ``chunk`` (one compile): ``chunk_size`` steps of every pool in one ``lax.scan``. A step runs the
  model once for all of a pool's rows, each at its own position (``int32[R]``), then
  ``decoding.search_step.search_step`` under ``jax.vmap`` over the groups, each with its own options
  (``SearchData``: penalties, temperature, top-p, min_length), step counter and PRNG key. The
  model state is reordered by the parent rows outside the vmap (``g * W + beam``). A group runs
  while it is active (the host gave it a request), not every row has finished and its step counter
  is below its request's ``max_length``; otherwise it does nothing (``generate`` idles the same
  way once a batch entry's rows have all finished). Its rows still go through the model (static
  shapes) at step 0, writing slots of their own that nothing reads again.
- ``finalize`` (one compile per pool): a finished group's step records ``[T, W]`` backtracked and
  sorted exactly as ``decoding.result.finalize`` does for a batch of one.

Why a request gets ``generate``'s result: its group runs the code ``generate`` runs for a batch of
one (the same ``search_step``, the options as data in both), its PRNG key is folded with its own
step counter as ``generate`` folds it (``fold_in(key, t)``; JAX's threefry draws under vmap are
the per-key draws), its memory and cache rows are its own, and records past its last step hold
what ``generate``'s idle steps record (the end id from the row's own beam). What can differ is
rounding: the model reads a longer, masked cache and memory (a padded source, the engine's
``max_length``), so sums are formed over more (zero) terms; scores agree to about 1e-6.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxformer.decoding.adapters import Adapter
from jaxformer.decoding.decode_options import DecodeOptions
from jaxformer.decoding.result import DecodingResult, finalize
from jaxformer.decoding.samplers import BestSampler, RandomSampler
from jaxformer.decoding.search_step import Search, SearchData, SearchState, StepRecord, search_step
from jaxformer.decoding.state import reorder, tile_batch
from jaxformer.decoding.strategies import BeamSearch, GreedySearch
from jaxformer.typing import Array, Bool, Int, PRNGKey, PyTree


@struct.dataclass
class RequestSampler:
    """A request's pick: the best candidates (``BestSampler``) or a draw (``RandomSampler``).

    ``sample``, ``temperature`` and ``top_p`` are data, one per request; the engine's ``topk`` and
    whether a nucleus may be asked for are static. Each draw is computed as ``generate`` computes it
    alone and the request's is selected (``jnp.where``, exact): with a nucleus allowed and no top-k,
    that is both the draw in the vocabulary's order (``top_p`` = 1) and the draw in sorted order
    (``top_p`` < 1) from the same key, so every sampling row pays a sort of the vocabulary per step.
    """

    sample: Any  # bool[]: draw (else the best candidates)
    temperature: Any  # float32[]
    top_p: Any  # float32[]
    topk: int | None = struct.field(pytree_node=False, default=None)  # None: no sampling at all
    nucleus: bool = struct.field(pytree_node=False, default=False)
    needs_rng = True

    def __call__(self, scores, num_samples: int, rng: PRNGKey):
        ids, picked = BestSampler()(scores, num_samples)
        if self.topk is None:
            return ids, picked
        draw = lambda nucleus: RandomSampler(
            self.topk, self.temperature, self.top_p, nucleus=nucleus
        )(scores, num_samples, rng)
        drawn_ids, drawn = draw(False)
        if self.nucleus:
            cut_ids, cut = draw(True)
            cut_off = self.top_p < 1.0
            drawn_ids, drawn = (
                jnp.where(cut_off, cut_ids, drawn_ids),
                jnp.where(cut_off, cut, drawn),
            )
        return jnp.where(self.sample, drawn_ids, ids), jnp.where(self.sample, drawn, picked)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shape of an engine: what its programs are compiled for (hashable)."""

    adapter: Adapter
    widths: tuple[int, ...]  # W of each pool
    groups: tuple[int, ...]  # G of each pool
    max_length: int  # T: the most steps a request may run
    max_input_length: int  # S: the longest source or prompt
    end_ids: tuple[int, ...]
    start_id: int | None  # encoder-decoder: the target's start token
    vocab: int
    sampling_topk: int | None  # None: no sampling; 0: the whole vocabulary; k: the k best
    nucleus: bool  # requests may ask for top_p < 1
    coverage: bool  # the coverage accumulator (requests may ask for a coverage penalty)
    chunk_size: int
    # Every request's: token ids never generated, and the length P of its forced target prefix
    # (encoder-decoder only; NLLB's target language, BART's forced first token). The prefix's
    # ids are each request's data (``PoolState.prefix``).
    suppress_ids: tuple[int, ...] = ()
    prefix_length: int = 0

    @property
    def encoder_decoder(self) -> bool:
        return self.adapter.inputs.needs_start_id

    def strategy(self, width: int, length_penalty=0.0, coverage_penalty=0.0):
        if width == 1:
            return GreedySearch()
        return BeamSearch(
            width, length_penalty, coverage_penalty, num_hypotheses=width, coverage=self.coverage
        )

    def search(self, width: int) -> Search:
        """The static half of a group's search (``search_step``'s ``search``): a batch of one."""
        strategy = self.strategy(width)
        attention = self.max_input_length if strategy.uses_coverage else 0
        return Search(
            strategy, None, self.end_ids, 1, self.vocab, self.max_length, None, False, False,
            attention, self.suppress_ids, self.prefix_length,
        )  # fmt: skip


@struct.dataclass
class PoolState:
    """One pool on the device. Group axis G first, or row axis R = G*W (the model state)."""

    search: SearchState  # ids/finished/lengths/cum_log_probs/scores [G, W]; rng key[G]
    model: PyTree  # the adapter's state for R rows, tiled (origin tables) and reordered
    shared: PyTree  # one entry per group (the encoder memory [G, ...]), or None
    data: SearchData  # each request's options as data, leaves [G]
    step: Any  # int32[G] steps its request has run
    max_length: Any  # int32[G] its request's max_length
    word_ids: Any  # int32[G, T, W] the step records of its request
    beam_ids: Any  # int32[G, T, W]
    prefix: Any  # int32[G, P] the target prefix forced on its request's first P steps

    @property
    def done(self) -> Bool[Array, " G"]:
        return jnp.all(self.search.finished, axis=1) | (self.step >= self.max_length)


def request_data(layout: Layout, width: int, options) -> SearchData:
    """A request's ``SearchData`` (NumPy float32 / int32 / bool scalars: they travel with the
    admission's call, no transfer of their own) from its ``DecodeOptions``."""
    sampler = RequestSampler(
        np.bool_(options.sampling_topk != 1),
        np.float32(options.sampling_temperature),
        np.float32(options.top_p),
        topk=layout.sampling_topk,
        nucleus=layout.nucleus,
    )
    penalties = np.float32(options.length_penalty), np.float32(options.coverage_penalty)
    return SearchData(layout.strategy(width, *penalties), sampler, np.int32(options.min_length))


def _new_groups(
    layout: Layout,
    width: int,
    params,
    inputs,
    lengths,
    data: SearchData,
    keys,
    max_lengths,
    prefixes,
) -> PoolState:
    """The pool state of A new groups (a batch of A requests, prepared together as ``generate``
    prepares a batch: each row's prefill is its own)."""
    adapter, count = layout.adapter, inputs.shape[0]
    if layout.encoder_decoder:
        prepared = adapter.prepare(params, inputs, None, layout.start_id, layout.max_length)
    else:  # every prompt's cache has max_input_length - 1 + max_length slots
        steps = layout.max_input_length - inputs.shape[1] + layout.max_length
        prepared = adapter.prepare(params, inputs, lengths, None, steps)
    strategy = layout.strategy(width)
    coverage = None
    if strategy.uses_coverage:
        coverage = jnp.zeros([count, width, layout.max_input_length], jnp.float32)
    rows = lambda x: x.reshape(count, width)
    search = SearchState(
        ids=rows(jnp.repeat(prepared.start_ids, width)),
        finished=jnp.zeros([count, width], bool),
        lengths=jnp.zeros([count, width], jnp.int32),
        cum_log_probs=rows(strategy.initial_log_probs(count)),
        scores=rows(strategy.initial_log_probs(count)),
        accumulated_attention=coverage,
        model_state=None,
        rng=jax.random.wrap_key_data(keys),
    )
    steps = (count, layout.max_length, width)
    idle = StepRecord(  # what generate records at the steps it does not run (loop._idle_record)
        word_ids=jnp.full(steps, layout.end_ids[0], jnp.int32),
        beam_ids=jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), steps),
        ran=None,
        attention=None,
        trace=None,
    )
    return PoolState(
        search=search,
        model=tile_batch(prepared.state, width),
        shared=prepared.shared,
        data=jax.tree.map(jnp.asarray, data),
        step=jnp.zeros([count], jnp.int32),
        max_length=jnp.asarray(max_lengths, jnp.int32),
        word_ids=idle.word_ids,
        beam_ids=idle.beam_ids,
        prefix=jnp.asarray(prefixes, jnp.int32).reshape(count, layout.prefix_length),
    )


def _put(pool_leaf, new_leaf, groups):
    """``new_leaf`` (A groups: A or A*W first) into ``pool_leaf`` (G or G*W first) at ``groups``
    (``[A]``; a group >= G is padding, dropped)."""
    if new_leaf.shape[1:] != pool_leaf.shape[1:]:  # a shorter source: zeros after it
        sizes = zip(pool_leaf.shape[1:], new_leaf.shape[1:], strict=True)
        pad = [(0, 0)] + [(0, p - o) for p, o in sizes]
        new_leaf = jnp.pad(new_leaf, pad)
    if new_leaf.dtype != pool_leaf.dtype:
        new_leaf = new_leaf.astype(pool_leaf.dtype)
    n = new_leaf.shape[0] // groups.shape[0]  # 1 or W rows per group
    rows = (groups[:, None] * n + jnp.arange(n)[None]).reshape(-1)  # [A*n]
    return pool_leaf.at[rows].set(new_leaf, mode="drop")


def admit(
    layout: Layout,
    pool: int,
    params,
    state: PoolState,
    groups,
    inputs,
    lengths,
    data,
    keys,
    max_lengths,
    prefixes,
) -> PoolState:
    """``state`` with A new requests in ``groups`` (int32[A]; G: padding): their prefill
    (``inputs`` int32[A, S], ``lengths`` int32[A]), options (``data``, leaves [A]), PRNG keys
    (``keys``: key data uint32[A, 2]), ``max_lengths`` int32[A], target prefixes (``prefixes``
    int32[A, P]) and fresh records."""
    width = layout.widths[pool]
    new = _new_groups(
        layout, width, params, inputs, lengths, data, keys, max_lengths, prefixes
    )  # fmt: skip
    return jax.tree.map(lambda p, o: _put(p, o, groups), state, new)


def empty_pool(layout: Layout, pool: int, params) -> PoolState:
    """A pool of zeros, shaped by tracing the admission of a longest input (nothing is run)."""
    width, groups = layout.widths[pool], layout.groups[pool]
    data = jax.tree.map(lambda x: np.asarray(x)[None], request_data(layout, width, DecodeOptions()))
    shapes = jax.eval_shape(
        lambda p: _new_groups(
            layout, width, p, jnp.zeros([1, layout.max_input_length], jnp.int32),
            jnp.ones([1], jnp.int32), data, jnp.zeros([1, 2], jnp.uint32), jnp.ones([1], jnp.int32),
            jnp.zeros([1, layout.prefix_length], jnp.int32),
        ),
        params,
    )  # fmt: skip

    def zeros(x):
        shape = (x.shape[0] * groups, *x.shape[1:])
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), groups)
        return jnp.zeros(shape, x.dtype)

    return jax.tree.map(zeros, shapes)


def pool_step(layout: Layout, pool: int, params, state: PoolState, active: Bool[Array, " G"]):
    """One step of every running group of a pool; returns the state and each group's first row's
    token (-1 where the group did not run): what a greedy or sampling request streams."""
    width, groups = layout.widths[pool], layout.groups[pool]
    rows = groups * width
    running = active & ~state.done  # [G]
    t = jnp.where(running, state.step, 0)  # [G]: idle groups stay at a position they own
    search = state.search
    logits, model, attention = _model_step(layout, params, search.ids.reshape(rows), t, state)
    logits = logits.reshape(groups, width, -1)  # [R, V] --> [G, W, V]
    static = layout.search(width)
    if static.wants_attention:
        attention = attention.astype(jnp.float32).reshape(groups, width, -1)  # [G, W, S]
    else:
        attention = None

    def group_step(state, logits, attention, t, data, prefix):
        prefix = prefix[None] if layout.prefix_length else None  # [P] --> [1, P]
        new, record, parents = search_step(static, state, logits, attention, t, data, prefix)
        return new, record.word_ids, record.beam_ids, parents

    new, word_ids, beam_ids, parents = jax.vmap(group_step)(
        search, logits, attention, t, state.data, state.prefix
    )  # [G, W] each
    keep = lambda old, ran: jnp.where(running.reshape((groups,) + (1,) * (old.ndim - 1)), ran, old)
    unkeyed = dict(rng=None, model_state=None)
    picked = jax.tree.map(keep, search.replace(**unkeyed), new.replace(**unkeyed))
    search = picked.replace(rng=search.rng)
    if width > 1:
        own = jnp.arange(rows, dtype=jnp.int32).reshape(groups, width)  # [G, W]
        parents = jnp.where(running[:, None], own - own % width + parents, own)  # [G, W]
        model = reorder(model, parents.reshape(rows))
    at = jnp.where(running, state.step, layout.max_length)  # out of range: dropped
    record = lambda old, new: old.at[jnp.arange(groups), at].set(new, mode="drop")
    state = state.replace(
        search=search,
        model=model,
        word_ids=record(state.word_ids, word_ids),
        beam_ids=record(state.beam_ids, beam_ids),
        step=state.step + running.astype(jnp.int32),
    )
    return state, jnp.where(running, word_ids[:, 0], -1)


def _model_step(layout: Layout, params, ids: Int[Array, " R"], t: Int[Array, " G"], state):
    """The adapter's step for every row of a pool, each row at its group's step."""
    width = ids.shape[0] // t.shape[0]
    steps = jnp.repeat(t, width)  # [G] --> [R]
    outputs = layout.adapter.step(params, ids, steps, state.model, state.shared)
    return outputs if len(outputs) == 3 else (*outputs, None)  # (logits, state[, attention])


def chunk(layout: Layout, params, states: tuple, actives: tuple):
    """``chunk_size`` steps of every pool. Returns the states, the streamed tokens
    ``[chunk_size, G]`` per pool, and each pool's step counters and done flags ``[G]``."""

    def body(states, _):
        stepped = [
            pool_step(layout, pool, params, state, active)
            for pool, (state, active) in enumerate(zip(states, actives, strict=True))
        ]
        return tuple(s for s, _ in stepped), tuple(tokens for _, tokens in stepped)

    states, tokens = jax.lax.scan(body, states, None, length=layout.chunk_size)
    report = tuple((state.step, state.done) for state in states)
    return states, tokens, report


def finalize_groups(layout: Layout, pool: int, state: PoolState) -> DecodingResult:
    """``finalize_group`` for every group at once (one call however many finished: the caller
    keeps those it wants), leaves ``[G, 1, W, ...]``."""
    groups = jnp.arange(layout.groups[pool])
    return jax.vmap(lambda g: finalize_group(layout, pool, state, g))(groups)


def finalize_group(layout: Layout, pool: int, state: PoolState, group) -> DecodingResult:
    """The hypotheses of ``group``'s request, best first, as ``generate`` returns a batch of one
    (``[1, W, T]``: the caller cuts them to its ``max_length`` and ``num_hypotheses``)."""
    take = lambda x: jax.lax.dynamic_index_in_dim(x, group, keepdims=False)
    steps = take(state.step)
    records = StepRecord(
        word_ids=take(state.word_ids),  # [T, W]
        beam_ids=take(state.beam_ids),
        ran=jnp.arange(layout.max_length) < steps,  # [T]
        attention=None,
        trace=None,
    )
    final = jax.tree.map(take, state.search.replace(rng=None, accumulated_attention=None))
    return finalize(records, final, layout.search(layout.widths[pool]))


__all__ = [
    "Layout",
    "PoolState",
    "RequestSampler",
    "admit",
    "chunk",
    "empty_pool",
    "finalize_group",
    "finalize_groups",
    "pool_step",
    "request_data",
]
