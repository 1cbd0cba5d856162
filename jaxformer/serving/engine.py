"""The continuous-batching engine: many requests decoded together, each as if it ran alone.

    engine = Engine(model, params, start_id=1, end_id=2, groups={1: 8, 4: 2}, max_length=64)
    handle = engine.submit(source_ids, DecodeOptions(beam_size=4, max_length=40))
    result = handle.result()            # what generate(model, params, [source_ids], ...) returns
    for tokens in engine.submit(prompt, DecodeOptions(max_length=20)).tokens(): ...  # streamed
    engine.close()

A fixed number of slots (rows) is decoded by one jit-compiled chunk of steps (``pool.py``); between
two chunks, finished requests leave and waiting requests are admitted into the free slots. The
slots come in pools, one per width: ``groups={1: 8, 4: 2}`` is 8 slots for greedy search or
sampling and 2 groups of 4 slots for beam search with 4 beams; a request takes one group of its
``beam_size``. What a request asks for in ``DecodeOptions`` is data wherever it can be: the length
and coverage penalties, temperature, top-p, ``min_length``, ``max_length`` (up to the engine's),
the seed and ``n_best``; what fixes shapes or the program is the engine's: the widths and group
counts, ``max_length`` and ``max_input_length`` (every cache's size), ``sampling_topk`` (one top-k
for all sampling requests, or no sampling), whether a nucleus (``top_p < 1``) and the coverage
penalty may be asked for at all, the tokens every request suppresses (``suppress_ids``: Marian's
padding) and the length of every request's forced target prefix (``prefix_length``: 1 for NLLB's
target language, whose token is each request's). Nothing is compiled per request; the admission
(the prefill of the requests admitted between two chunks, together) once per input bucket (inputs
are padded to a multiple of ``bucket`` tokens; the padding is masked) and per number admitted (a
power of two).

**A request's result is the one ``generate`` gives for it alone** (a batch of one, same options):
the same ids and lengths, log-probs and scores to rounding (``pool.py`` says why), whatever else
runs beside it and whatever the chunk size.

Threads: the engine runs on its own thread, the only one that touches the device. ``submit``
may be called from any thread; it checks the request at once (a ``ValueError`` names what this
engine cannot do) and returns a ``Handle``: ``result()`` (a ``concurrent.futures.Future``
underneath), ``tokens()`` (the new tokens of a greedy or sampling request as they are decoded; a
beam search's tokens come with its result), ``cancel()`` (its slots are freed before the next
chunk). ``await handle.aresult()`` and ``async for tokens in handle.atokens()`` serve an asyncio
event loop. ``close()`` stops the engine: unfinished requests are cancelled (``close(finish=True)``
decodes them first).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxformer.decoding import options as opt
from jaxformer.decoding.adapters import adapter_for
from jaxformer.decoding.decode_options import DecodeOptions
from jaxformer.decoding.generation import check_for_family, cpu_compiler_options
from jaxformer.decoding.result import DecodingResult
from jaxformer.decoding.strategies import GreedySearch
from jaxformer.serving import pool as pools
from jaxformer.serving.handle import Handle
from jaxformer.serving.pool import Layout


@dataclasses.dataclass
class _Slot:
    handle: Handle
    max_length: int
    n_best: int


# DecodeOptions the engine does not serve yet, with their neutral values (``target_prefix`` and
# ``suppress_ids`` it serves when made for them: ``prefix_length``, ``suppress_ids``).
UNSERVED = (
    ("repetition_penalty", 1.0),
    ("no_repeat_ngram_size", 0),
    ("stop", ()),
)


def check_served(options: DecodeOptions) -> None:
    """Refuses the options no engine serves yet (``generate`` and static batching do)."""
    for name, neutral in UNSERVED:
        if getattr(options, name) != neutral:
            raise ValueError(f"{name}: not served by the engine (decode without it)")


@functools.lru_cache(maxsize=1024)
def _key_data(seed: int) -> np.ndarray:
    """The data of ``jax.random.key(seed)`` (what ``DecodeOptions.rng`` makes), once per seed."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


class Engine:
    """Continuous batching over fixed slots (the module docstring has the whole story).

    ``groups``: ``{width: number of groups}``; width 1 serves greedy search and sampling, a width
    W > 1 serves beam search with W beams. ``max_length``: the most tokens a request may ask for;
    ``max_input_length``: the longest source or prompt. ``sampling_topk``: None (no sampling), 0
    (the whole vocabulary) or k; ``nucleus``: whether sampling requests may set ``top_p < 1``
    (each sampling step then also sorts the vocabulary); ``coverage``: whether beam requests may
    set a coverage penalty (the attention accumulator). ``chunk_size``: steps between two looks
    at the requests (results do not depend on it). ``bucket``: inputs are padded to a multiple
    of it (one prefill compile per bucket and number of requests admitted together, a power of
    two). ``suppress_ids``: the token ids no request generates (each request's
    ``DecodeOptions.suppress_ids`` must be these); ``prefix_length``: P, the length of every
    request's ``target_prefix`` (encoder-decoder models: forced tokens after the start token,
    e.g. NLLB's target language; their ids are the request's).
    """

    def __init__(
        self,
        model,
        params,
        *,
        end_id: int | tuple[int, ...],
        start_id: int | None = None,
        groups: dict[int, int] | None = None,
        max_length: int = 64,
        max_input_length: int = 64,
        sampling_topk: int | None = None,
        nucleus: bool = True,
        coverage: bool = False,
        chunk_size: int = 8,
        bucket: int = 16,
        start: bool = True,
        suppress_ids: Sequence[int] = (),
        prefix_length: int = 0,
    ):
        adapter = adapter_for(model)
        spec = adapter.inputs
        groups = {1: 8} if groups is None else dict(groups)
        _check_sizes(adapter, groups, max_length, max_input_length, sampling_topk)
        opt.require_int("chunk_size", chunk_size, 1)
        opt.require_int("bucket", bucket, 1)
        end_ids, start_id, suppress_ids = _check_ids(
            spec, end_id, start_id, suppress_ids, prefix_length, max_length
        )
        widths = tuple(sorted(groups))
        self.layout = Layout(
            adapter=adapter,
            widths=widths,
            groups=tuple(groups[w] for w in widths),
            max_length=max_length,
            max_input_length=max_input_length,
            end_ids=end_ids,
            start_id=start_id,
            vocab=spec.target_vocab_size,
            sampling_topk=sampling_topk,
            nucleus=nucleus and sampling_topk is not None,
            coverage=coverage and any(w > 1 for w in widths),
            chunk_size=chunk_size,
            suppress_ids=suppress_ids,
            prefix_length=prefix_length,
        )
        self.bucket = bucket
        self.traces: collections.Counter[str] = collections.Counter()  # per program, per trace
        self._params = params
        self._programs()
        self._states = tuple(pools.empty_pool(self.layout, p, params) for p in range(len(widths)))
        self._slots: list[list[_Slot | None]] = [[None] * g for g in self.layout.groups]
        self._waiting: collections.deque[Handle] = collections.deque()
        self._inbox: queue.Queue[Handle | None] = queue.Queue()
        self._closing = False
        self._finish_first = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jaxformer-engine", daemon=True)
        if start:
            self._thread.start()

    # Programs (compiled once per layout; the admission once per input bucket and size).
    def _programs(self) -> None:
        layout, options = self.layout, cpu_compiler_options()

        def chunk(params, states, actives):
            self.traces["chunk"] += 1
            return pools.chunk(layout, params, states, actives)

        def admit(pool, params, state, groups, inputs, lengths, data, keys, max_lengths, prefixes):
            self.traces[f"admit[{layout.widths[pool]}]"] += 1
            return pools.admit(
                layout, pool, params, state, groups, inputs, lengths, data, keys, max_lengths,
                prefixes,
            )  # fmt: skip

        def finalize(pool, state):
            self.traces[f"finalize[{layout.widths[pool]}]"] += 1
            return pools.finalize_groups(layout, pool, state)

        jit = functools.partial(jax.jit, compiler_options=options)
        self._chunk = jit(chunk, donate_argnums=1)
        self._admit = [
            jit(functools.partial(admit, pool), donate_argnums=1)
            for pool in range(len(layout.widths))
        ]
        self._finalize = [
            jit(functools.partial(finalize, pool)) for pool in range(len(layout.widths))
        ]

    # Submitting (any thread).
    def submit(
        self,
        inputs: Sequence[int] | np.ndarray,
        options: DecodeOptions | None = None,
        *,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> Handle:
        """Queue a request (a source's or a prompt's token ids) and return its ``Handle``.

        ``options``: ``DecodeOptions`` (default: greedy search to the engine's ``max_length``);
        refused at once when this engine cannot serve them. ``on_tokens(list)`` is called on the
        engine's thread with each chunk's new tokens (greedy search and sampling)."""
        if options is None:
            options = DecodeOptions(max_length=self.layout.max_length)
        array = self._check(inputs, options)
        handle = Handle(array, options, on_tokens)
        handle._engine = self
        if self._closing:
            raise RuntimeError(
                "the engine is closed"
                if self._error is None
                else f"the engine failed: {self._error!r}"
            )
        self._inbox.put(handle)
        return handle

    def _check(self, inputs, options: DecodeOptions) -> np.ndarray:
        layout, spec = self.layout, self.layout.adapter.inputs
        if not isinstance(options, DecodeOptions):
            raise TypeError(f"options must be DecodeOptions, got {type(options).__name__}")
        array = np.asarray(inputs)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"inputs must be one {spec.name}'s token ids (a 1-D list of ints)")
        if not spec.shortest <= array.size <= layout.max_input_length:
            raise ValueError(
                f"inputs: a {spec.name} of {array.size} tokens; this engine takes "
                f"{spec.shortest} to max_input_length={layout.max_input_length}"
            )
        if array.size and (array.min() < 0 or array.max() >= spec.vocab_size):
            raise ValueError(f"inputs: {spec.name} ids must be in [0, {spec.vocab_size})")
        o = options
        if o.beam_size not in layout.widths:
            raise ValueError(
                f"beam_size={o.beam_size}: this engine has groups of widths {layout.widths}"
            )
        if o.max_length > layout.max_length:
            raise ValueError(f"max_length={o.max_length} exceeds the engine's {layout.max_length}")
        if o.sampling_topk != 1 and o.sampling_topk != layout.sampling_topk:
            can = (
                "does not sample"
                if layout.sampling_topk is None
                else f"samples with sampling_topk={layout.sampling_topk}"
            )
            raise ValueError(f"sampling_topk={o.sampling_topk}: this engine {can}")
        if o.top_p < 1 and not layout.nucleus:
            raise ValueError("top_p < 1: this engine was made with nucleus=False")
        if o.coverage_penalty != 0 and not layout.coverage:
            raise ValueError("coverage_penalty: this engine was made without coverage=True")
        self._check_forced(o)
        check_served(o)
        return array.astype(np.int32)

    def _check_forced(self, o: DecodeOptions) -> None:
        """Checks ``target_prefix`` and ``suppress_ids`` against the engine's (``prefix_length``
        and ``suppress_ids``, the same for every request)."""
        layout = self.layout
        if (o.target_prefix or layout.prefix_length) and len(o.target_prefix) != (
            layout.prefix_length
        ):
            raise ValueError(
                f"target_prefix of {len(o.target_prefix)} tokens: this engine forces "
                f"prefix_length={layout.prefix_length}"
            )
        if any(not 0 <= i < layout.vocab or i in layout.end_ids for i in o.target_prefix):
            raise ValueError(f"target_prefix: ids in [0, {layout.vocab}) other than the end ids")
        if tuple(sorted(set(o.suppress_ids))) != layout.suppress_ids:
            raise ValueError(
                f"suppress_ids={o.suppress_ids}: this engine suppresses {layout.suppress_ids}"
            )

    # Stopping (any thread).
    def close(self, finish: bool = False, timeout: float | None = None) -> None:
        """Stop the engine: cancel what has not finished (``finish``: decode it first) and wait
        for its thread."""
        self._finish_first = finish
        self._closing = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: end its requests here
            while finish and self.step():
                pass
            self._fail(None)

    def occupancy(self) -> tuple[int, dict[int, int]]:
        """``(requests waiting for a group, {width: groups decoding a request})``: a snapshot for
        monitoring, read from any thread."""
        waiting = len(self._waiting) + self._inbox.qsize()  # (the inbox may hold wake-ups too)
        slots = self._slots
        busy = {w: sum(s is not None for s in slots[p]) for p, w in enumerate(self.layout.widths)}
        return waiting, busy

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _wake(self) -> None:
        self._inbox.put(None)

    def start(self) -> None:
        """Start the engine's thread (an engine made with ``start=False``)."""
        self._thread.start()

    def step(self) -> bool:
        """One turn of the engine on the caller's thread, for an engine that was not started: take
        the submitted requests, drop the cancelled ones, admit what fits, run one chunk. Returns
        whether a chunk ran (False: nothing to do). Tests drive the engine this way."""
        if self._thread.is_alive():
            raise RuntimeError("the engine runs on its own thread; step() is for one not started")
        self._collect(block=False)
        return self._turn()

    # The engine's thread.
    def _run(self) -> None:
        try:
            while True:
                idle = not self._busy() and not self._waiting  # nothing to do but wait
                self._collect(block=idle and not self._closing)
                if self._closing and not (self._finish_first and (self._busy() or self._waiting)):
                    break
                self._turn()
        except BaseException as error:  # handed to every caller still waiting
            self._error = error
            self._closing = True
            self._fail(error)
            raise
        finally:
            self._fail(None)

    def _turn(self) -> bool:
        self._drop_cancelled()
        self._admit_waiting()
        if not self._busy():
            return False
        self._step()
        return True

    def _busy(self) -> bool:
        return any(slot is not None for slots in self._slots for slot in slots)

    def _collect(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for slots in self._slots:
            for group, slot in enumerate(slots):
                if slot is not None and slot.handle.future.cancelled():
                    slots[group] = None
                    slot.handle._finish()
        for handle in [h for h in self._waiting if h.future.cancelled()]:
            self._waiting.remove(handle)
            handle._finish()

    def _admit_waiting(self) -> None:
        """Admit waiting requests in their order of arrival while their pool has a free group
        (a request whose pool is full does not hold back the others), one call per pool."""
        free = [
            collections.deque(g for g, s in enumerate(slots) if s is None) for slots in self._slots
        ]
        admitted: list[list[tuple[int, Handle]]] = [[] for _ in self._slots]
        still = collections.deque()
        while self._waiting and any(free):
            handle = self._waiting.popleft()
            pool = self.layout.widths.index(handle.options.beam_size)
            if free[pool]:
                admitted[pool].append((free[pool].popleft(), handle))
            else:
                still.append(handle)
        still.extend(self._waiting)
        self._waiting = still
        for pool, requests in enumerate(admitted):
            if requests:
                self._admit_all(pool, requests)

    def _admit_all(self, pool: int, requests: list[tuple[int, Handle]]) -> None:
        """One admission call for ``requests`` (``(group, handle)``), padded to a power of two
        (padding rows go to group G: dropped), inputs to the longest one's bucket."""
        layout = self.layout
        count = 1 << (len(requests) - 1).bit_length()  # the admission size: a power of two
        longest = max(handle.inputs.size for _, handle in requests)
        width = min(layout.max_input_length, max(1, -(-longest // self.bucket)) * self.bucket)
        inputs = np.full([count, width], layout.adapter.inputs.pad_id, np.int32)
        lengths = np.ones([count], np.int32)
        groups = np.full([count], layout.groups[pool], np.int32)
        max_lengths = np.ones([count], np.int32)
        prefixes = np.zeros([count, layout.prefix_length], np.int32)
        datas, keys = [], []
        for row, (group, handle) in enumerate(requests):
            o, size = handle.options, handle.inputs.size
            inputs[row, :size] = handle.inputs
            lengths[row], groups[row], max_lengths[row] = max(size, 1), group, o.max_length
            prefixes[row] = o.target_prefix
            datas.append(pools.request_data(layout, layout.widths[pool], o))
            keys.append(_key_data(o.seed if o.sampling_topk != 1 else 0))  # DecodeOptions.rng's
            self._slots[pool][group] = _Slot(handle, o.max_length, o.n_best)
        datas += datas[:1] * (count - len(requests))
        keys += keys[:1] * (count - len(requests))
        data = jax.tree.map(lambda *x: np.stack(x), *datas)
        states = list(self._states)
        states[pool] = self._admit[pool](
            self._params, states[pool], groups, inputs, lengths, data, np.stack(keys), max_lengths,
            prefixes,
        )  # fmt: skip
        self._states = tuple(states)

    def _step(self) -> None:
        actives = tuple(np.asarray([slot is not None for slot in slots]) for slots in self._slots)
        self._states, tokens, report = self._chunk(self._params, self._states, actives)
        tokens, report = jax.device_get((tokens, report))
        for pool, slots in enumerate(self._slots):
            _, done = report[pool]
            finished = [g for g, slot in enumerate(slots) if slot is not None and done[g]]
            results = jax.device_get(self._finalize[pool](self._states[pool])) if finished else None
            for group, slot in enumerate(slots):
                if slot is None:
                    continue
                if self.layout.widths[pool] == 1:
                    self._stream(slot.handle, tokens[pool][:, group])
                if group in finished:
                    slots[group] = None
                    slot.handle._finish(self._result(results, group, slot))

    def _stream(self, handle: Handle, tokens: np.ndarray) -> None:
        new = []
        for token in tokens.tolist():
            if token < 0 or token in self.layout.end_ids:
                break
            new.append(token)
        if new:
            handle._push(new)

    @staticmethod
    def _result(results: DecodingResult, group: int, slot: _Slot) -> DecodingResult:
        """Group ``group``'s result cut to its request's ``n_best`` and ``max_length``."""
        n, length = slot.n_best, slot.max_length
        return DecodingResult(
            ids=results.ids[group, :, :n, :length],
            lengths=results.lengths[group, :, :n],
            log_probs=results.log_probs[group, :, :n],
            scores=results.scores[group, :, :n],
            attention=None,
            steps=results.steps[group],
        )

    def _fail(self, error: BaseException | None) -> None:
        """End every request still held: with ``error``, or cancelled (None)."""
        handles = [slot.handle for slots in self._slots for slot in slots if slot is not None]
        handles += list(self._waiting)
        self._waiting.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                handles.append(item)
        self._slots = [[None] * len(slots) for slots in self._slots]
        for handle in handles:
            handle._finish(error=error)


def _check_sizes(adapter, groups: dict, max_length, max_input_length, sampling_topk) -> None:
    """The engine's shape: its groups, lengths and top-k, within the model's."""
    spec = adapter.inputs
    if not groups:
        raise ValueError("groups must map widths to group counts, e.g. {1: 8, 4: 2}")
    for width, count in groups.items():
        opt.require_int("groups: a width", width, 1)
        opt.require_int(f"groups[{width}]", count, 1)
    opt.require_int("max_length", max_length, 1)
    opt.require_int("max_input_length", max_input_length, 1)
    if sampling_topk is not None:
        opt.require_int("sampling_topk", sampling_topk, 0, spec.target_vocab_size)
    if max(groups) > spec.target_vocab_size:
        raise ValueError(f"a width of {max(groups)} exceeds the vocabulary")
    positions = adapter.positions(max_input_length, max_length)
    if positions > spec.max_len or max_input_length > spec.max_len:
        raise ValueError(
            f"max_input_length={max_input_length} and max_length={max_length} need "
            f"{max(positions, max_input_length)} positions, more than the model's "
            f"max_len={spec.max_len}"
        )


def _check_ids(spec, end_id, start_id, suppress_ids, prefix_length: int, max_length: int):
    """The engine's token ids: ``(end_ids, start_id, suppress_ids)`` as its ``Layout`` holds them
    (a decoder-only model's start id is None), checked against the vocabulary."""
    end_id = opt.static_end_id(end_id)
    end_ids = end_id if isinstance(end_id, tuple) else (end_id,)
    check_for_family(spec, start_id)
    start_id = start_id if spec.needs_start_id else None
    opt.check_vocabulary(
        spec.target_vocab_size, GreedySearch(), None, end_id=end_id, start_id=start_id
    )
    opt.require_int("prefix_length", prefix_length, 0)
    if prefix_length and not spec.needs_start_id:
        raise ValueError("prefix_length: a target prefix is for encoder-decoder models")
    if prefix_length >= max_length:
        raise ValueError(f"prefix_length={prefix_length} must be below max_length={max_length}")
    if suppress_ids:
        suppress_ids = opt.check_suppress_ids(suppress_ids, spec.target_vocab_size, end_id)
    return end_ids, start_id, tuple(suppress_ids)


__all__ = ["UNSERVED", "Engine", "Handle", "check_served"]
