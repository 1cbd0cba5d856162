"""Server-sent events: a streamed completion as OpenAI's clients read it (``data: {...}`` per
piece of text, each choice's ``finish_reason`` in its last chunk, ``usage`` last when asked, then
``data: [DONE]``), and ``EventStream``, the response that sends them and stops, cancelling the
engine requests, as soon as the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from starlette.responses import Response

from jaxformer.serving.app import EngineStopped, ServerState
from jaxformer.serving.choices import Job, decode_choices, header, usage
from jaxformer.serving.requests import RequestError


async def events(state: ServerState, job: Job):
    """The server-sent events of a streamed request (``data: {...}``, then ``data: [DONE]``)."""
    head = header(state)
    started, first = time.perf_counter(), [True]
    queue: asyncio.Queue = asyncio.Queue()

    def chunk(index, text, reason=None) -> str:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
        return sse({**head, "choices": [choice]})

    async def emit(index, piece):
        if first[0]:
            first[0] = False
            state.metrics.first_token.observe(time.perf_counter() - started)
        await queue.put(chunk(index, piece))

    async def decode():
        try:
            done = await decode_choices(state, job, emit)
            for d in sorted(done, key=lambda d: d.index):
                await queue.put(chunk(d.index, "", d.finish_reason))
            if job.usage_chunk:
                await queue.put(sse({**head, "choices": [], "usage": usage(job, done)}))
        except RequestError as error:
            await queue.put(sse({"error": {"message": error.message, "param": error.field}}))
        except EngineStopped as error:
            await queue.put(sse({"error": {"message": str(error), "type": "server_error"}}))
        await queue.put(None)

    if job.echo:
        for c in job.choices:
            yield chunk(c.index, c.prompt_text)
    task = asyncio.ensure_future(decode())
    try:
        while (item := await queue.get()) is not None:
            yield item
        yield "data: [DONE]\n\n"
    finally:
        task.cancel()
        with _suppressed():
            await task


def _suppressed():
    return contextlib.suppress(asyncio.CancelledError)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(Response):
    """A ``text/event-stream`` response that stops (and cancels its events, hence the engine
    requests) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events, on_close=lambda: None, on_disconnect=lambda: None):
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache"})  # no body: no content-length
        self.events, self.on_close, self.on_disconnect = events, on_close, on_disconnect

    async def __call__(self, scope, receive, send):
        try:
            await self._send(receive, send)
        finally:
            self.on_close()

    async def _send(self, receive, send):
        async def stream():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                body = event.encode("utf-8")
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected():
            while (await receive())["type"] != "http.disconnect":
                pass

        writing = asyncio.ensure_future(stream())
        watching = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({writing, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writing, watching):
                task.cancel()
            with _suppressed():
                await writing
            await self.events.aclose()
        if writing.cancelled():  # the client left first
            self.on_disconnect()
        elif writing.exception() is not None:
            raise writing.exception()


__all__ = ["EventStream", "events", "sse"]
