"""Many inputs through a fixed-shape decoder: bounded windows, length-sorted batches, input order out.

    for index, output in in_order(encoded, decode, batch_size=32, window=512):
        write(output)          # index 0, 1, 2, ... as soon as every earlier input is done

The inputs are read in windows of ``window`` consecutive items. Within a window they are sorted by
length and cut into batches of ``batch_size`` rows whose width is rounded up to a multiple of
``length_step`` (the last batch of a window is filled with filler rows), so a corpus of any size
compiles a handful of shapes (one per width bucket) and little padding is decoded. After each
batch, every output whose predecessors are all done is yielded, so an interrupted run has
delivered all but at most one window's outputs, in input order. CTranslate2's ``translate_file``
works the same way: it sorts what it has read (``read_batch_size``), never the whole file.

Empty inputs are not decoded: ``empty()`` gives their output. A row's result does not depend on the
other rows of its batch (the search's guarantee), so windows and batches change nothing but speed;
only a sampled search's random keys follow the batches (one key per batch, in decoding order).

``in_order_submitted`` does the same for a decoder that runs beside the caller and takes items one
at a time (the serving engine's continuous batching): it keeps ``window`` items submitted ahead of
the next one to yield, so the decoder always has work while outputs leave in input order.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxformer.decoding.options import require_int

WINDOW_BATCHES = 16  # the default window: this many batches of lines


def round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def padded_batch(
    items: Sequence[Sequence[int]],
    chunk: Sequence[int],
    batch_size: int,
    width: int,
    pad_id: int,
    filler: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(index int32[B], ids int32[B, width], lengths int32[B])`` for the items in ``chunk``,
    right-padded with ``pad_id``; rows past ``len(chunk)`` hold ``filler`` with index -1."""
    ids = np.full((batch_size, width), pad_id, np.int32)
    index = np.full((batch_size,), -1, np.int32)
    lengths = np.full((batch_size,), len(filler), np.int32)
    ids[:, : len(filler)] = filler
    for row, i in enumerate(chunk):
        ids[row, : len(items[i])] = items[i]
        ids[row, len(items[i]) :] = pad_id
        index[row], lengths[row] = i, len(items[i])
    return index, ids, lengths


def sorted_batches(
    items: Sequence[Sequence[int]],
    positions: Sequence[int],
    batch_size: int,
    *,
    length_step: int = 16,
    pad_id: int = 0,
    max_width: int | None = None,
    filler: Sequence[int] = (),
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The items at ``positions`` sorted by length and cut into ``padded_batch``es; a batch's
    width is its longest item rounded up to ``length_step`` (at most ``max_width``)."""
    order = sorted(positions, key=lambda i: len(items[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest = max(len(items[i]) for i in chunk)
        width = round_up(longest, length_step)
        if max_width is not None:
            width = max(min(width, max_width), longest)
        batches.append(padded_batch(items, chunk, batch_size, width, pad_id, filler))
    return batches


def in_order(
    items: Sequence[Sequence[int]],
    decode: Callable[[np.ndarray, np.ndarray, np.ndarray], Sequence[Any]],
    empty: Callable[[int], Any] | None,
    *,
    batch_size: int,
    window: int | None = None,
    **batching,
) -> Iterator[tuple[int, Any]]:
    """``(index, output)`` for every item, in input order, each as soon as it and all earlier
    items are done. ``decode(index, ids, lengths)`` returns one output per row of a
    ``sorted_batches`` batch (filler rows included; they are dropped); ``empty(i)`` is item i's
    output when it has no tokens. ``window``: items sorted together (default ``WINDOW_BATCHES``
    batches); ``batching``: ``sorted_batches``' keyword options."""
    require_int("batch_size", batch_size, 1)
    window = WINDOW_BATCHES * batch_size if window is None else require_int("window", window, 1)
    for start in range(0, len(items), window):
        stop = min(start + window, len(items))
        done = {i: empty(i) for i in range(start, stop) if not len(items[i])}
        todo = [i for i in range(start, stop) if len(items[i])]
        following = start
        for index, ids, lengths in sorted_batches(items, todo, batch_size, **batching):
            for row, output in zip(index.tolist(), decode(index, ids, lengths), strict=True):
                if row >= 0:
                    done[row] = output
            while following in done:
                yield following, done.pop(following)
                following += 1
        while following in done:  # a window of empty items only
            yield following, done.pop(following)
            following += 1


def in_order_submitted(
    items: Sequence[Sequence[int]],
    submit: Callable[[int], Any],
    output: Callable[[int, Any], Any],
    empty: Callable[[int], Any] | None,
    *,
    window: int,
) -> Iterator[tuple[int, Any]]:
    """``(index, output)`` for every item in input order, each as soon as it and all earlier items
    are done. ``submit(i)`` hands item i to a decoder running on its own and returns a handle
    (``result()`` blocks until it is decoded; ``cancel()``); ``output(i, result)`` makes item i's
    output. At most ``window`` items are in flight, counted from the next one to yield: a long
    item holds back the writing of later ones, not their decoding. Closing the iterator early (an
    interrupted caller) cancels what is in flight. Empty items are not submitted (``empty(i)``)."""
    require_int("window", window, 1)
    flight: collections.deque = collections.deque()  # (index, handle or None), in input order
    try:
        for i in range(len(items)):
            flight.append((i, submit(i) if len(items[i]) else None))
            while flight and (len(flight) >= window or i == len(items) - 1):
                index, handle = flight.popleft()
                yield index, empty(index) if handle is None else output(index, handle.result())
    finally:
        for _, handle in flight:
            if handle is not None:
                handle.cancel()
