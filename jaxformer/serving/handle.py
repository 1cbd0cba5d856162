"""A submitted request as its caller sees it: the result, the streamed tokens, cancellation.

The engine's thread pushes tokens and the end (``_push``, ``_finish``); any other thread, or an
asyncio event loop, reads them (``result``, ``tokens``, ``aresult``, ``atokens``) and may cancel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np

from jaxformer.decoding.decode_options import DecodeOptions
from jaxformer.decoding.result import DecodingResult


class Handle:
    """A submitted request: its result, its streamed tokens, its cancellation. Thread-safe."""

    def __init__(self, inputs: np.ndarray, options: DecodeOptions, on_tokens=None):
        self.inputs = inputs
        self.options = options
        self.future: concurrent.futures.Future[DecodingResult] = concurrent.futures.Future()
        self._on_tokens = on_tokens
        self._tokens: list[int] = []
        self._ended = False
        self._changed = threading.Condition()
        self._watchers: list[Callable[[], None]] = []
        self._engine: Any = None  # the Engine, woken by cancel()

    # The engine's side (its thread only).
    def _push(self, tokens: list[int]) -> None:
        with self._changed:
            self._tokens.extend(tokens)
            self._changed.notify_all()
            watchers = list(self._watchers)
        if self._on_tokens is not None:
            self._on_tokens(tokens)
        for watch in watchers:
            watch()

    def _finish(self, result: DecodingResult | None = None, error: BaseException | None = None):
        if result is not None or error is not None:
            try:
                if error is None:
                    self.future.set_result(result)
                else:
                    self.future.set_exception(error)
            except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                pass
        else:
            self.future.cancel()
        with self._changed:
            self._ended = True
            self._changed.notify_all()
            watchers = list(self._watchers)
        for watch in watchers:
            watch()

    # The caller's side.
    def result(self, timeout: float | None = None) -> DecodingResult:
        """``generate``'s result for this request alone: ``ids [1, n_best, max_length]``, ...
        Raises ``concurrent.futures.CancelledError`` if it was cancelled."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel the request (False if it had finished); its slots are freed before the next chunk."""
        cancelled = self.future.cancel()
        if cancelled and self._engine is not None:
            self._engine._wake()
        return cancelled

    def done(self) -> bool:
        return self.future.done()

    def tokens(self, timeout: float | None = None) -> Iterator[list[int]]:
        """The request's new tokens, a list per chunk, until it ends (greedy search and sampling:
        the hypothesis's tokens before its end token; beam search: nothing, see ``result``)."""
        seen = 0
        while True:
            with self._changed:
                ready = functools.partial(self._ready, seen)
                if not self._changed.wait_for(ready, timeout):
                    raise TimeoutError("no token within the timeout")
                new, ended = self._tokens[seen:], self._ended
            seen += len(new)
            if new:
                yield new
            if ended and seen == len(self._tokens):
                return

    def _ready(self, seen: int) -> bool:
        return len(self._tokens) > seen or self._ended

    async def aresult(self) -> DecodingResult:
        """``result()`` for an asyncio event loop (cancelling the awaiting task cancels the request)."""
        try:
            return await asyncio.wrap_future(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def atokens(self) -> AsyncIterator[list[int]]:
        """``tokens()`` for an asyncio event loop."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        watch = lambda: loop.call_soon_threadsafe(changed.set)
        with self._changed:
            self._watchers.append(watch)
        try:
            seen = 0
            while True:
                with self._changed:
                    new, ended = self._tokens[seen:], self._ended
                seen += len(new)
                if new:
                    yield new
                if ended and seen == len(self._tokens):
                    return
                if not new:
                    await changed.wait()
                    changed.clear()
        finally:
            with self._changed:
                self._watchers.remove(watch)
