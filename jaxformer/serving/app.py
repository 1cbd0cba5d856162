"""The HTTP server's parts (Starlette, served by uvicorn: ``server.py`` makes the application): what
every route shares, and the routes every server has, ``GET /health`` and ``GET /metrics``.

- **Readiness.** At start-up the engine is warmed with dummy requests, one per beam width (and,
  with ``warmup="all"``, one per input bucket), so that its programs are compiled before a user
  waits on them; ``GET /health`` answers 503 until they are done, then 200.
- **Admission.** Each text, prompt or choice is one engine request. At most ``capacity`` of them
  are in flight (the engine's groups plus ``queue_size`` waiting): a request that would pass it is
  answered 503 with ``Retry-After``, never queued without bound.
- **Disconnects.** A request whose client goes away is cancelled: its engine requests leave their
  slots before the next chunk.
- **Draining** (``drain``, on SIGTERM): new requests are answered 503, ``/health`` too, the requests
  in flight run to their end; ``server.py`` then stops uvicorn and the engine.

The API routes are in ``libretranslate.py`` (translation models) and ``completions.py``
(decoder-only models), which import this module (``server.make_app`` puts them together); their errors are ``RequestError``s, which each API words as its clients
expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxformer.serving.engine import Engine
from jaxformer.serving.handle import Handle
from jaxformer.serving.metrics import Metrics
from jaxformer.serving.requests import Limits, RequestError, decode_options
from jaxformer.serving.served import ServedModel

log = logging.getLogger("jaxformer.serve")
RETRY_AFTER = 1  # seconds, in 503 answers


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class EngineStopped(Exception):
    """The engine cancelled a request (it was closed)."""


class ServerState:
    """One server: the model, its engine, admission and readiness."""

    def __init__(
        self,
        served: ServedModel,
        engine: Engine,
        *,
        queue_size: int = 64,
        warmup: str = "first",
        random_seeds: bool = True,
    ):
        self.served, self.engine = served, engine
        self.limits = Limits.of(engine)
        self.metrics = Metrics(engine)
        self.capacity = sum(engine.layout.groups) + queue_size
        self.warmup = warmup
        self.random_seeds = random_seeds  # sampling requests without a seed draw a fresh one
        self.in_engine = 0  # engine requests admitted and not finished
        self.in_flight = 0  # HTTP requests being answered
        self.ready = False
        self.draining = False
        self.failed: BaseException | None = None
        self.request_exit: Callable[[], None] = lambda: None  # set by server.py

    # Readiness and draining.
    async def warm_up(self) -> None:
        """Compile the engine's programs with dummy requests, then report ready."""
        started = time.perf_counter()
        layout, served = self.engine.layout, self.served
        bucket = self.engine.bucket
        sizes = [1]
        if self.warmup == "all":
            sizes = sorted(
                {*range(bucket, layout.max_input_length, bucket), layout.max_input_length}
            )
        handles = []
        try:
            for width in layout.widths:
                given = {"beam_size": width, "n_best": 1, "sampling_topk": 1}
                given["max_length"] = served.prefix_length + 1
                options = decode_options(served.defaults, given, self.limits)
                token = next(i for i in range(8) if i not in layout.end_ids)  # any but an end
                prefix = served.target_prefix(None) if served.prefix_length else ()
                if len(prefix) != served.prefix_length:  # a multilingual model: any language
                    prefix = (token,) * served.prefix_length
                options = _with(options, target_prefix=prefix)
                for size in sizes:
                    inputs = [token] * size
                    handles.append(self.engine.submit(inputs, options))
            for handle in handles:
                await result_of(handle)
        except Exception as error:
            self.failed = error
            log.exception("warming up the engine failed; stopping")
            self.request_exit()
            return
        self.ready = True
        self.metrics.ready.set(1)
        log.info(
            "ready: %d warm-up requests compiled and ran in %.1f s",
            len(handles),
            time.perf_counter() - started,
        )

    def drain(self) -> None:
        """Stop admitting; ``server.py`` exits once nothing is in flight."""
        if not self.draining:
            log.info("draining: %d requests in flight; new ones are refused", self.in_flight)
        self.draining = True
        self.metrics.ready.set(0)

    def check_admitting(self) -> None:
        if self.failed is not None:
            raise RequestError(f"the engine failed: {self.failed!r}", status=500)
        if self.draining:
            raise RequestError("the server is shutting down", status=503)
        if not self.ready:
            raise RequestError("the server is starting (compiling); retry shortly", status=503)

    @contextlib.contextmanager
    def admitted(self, count: int, field: str):
        """Room for ``count`` engine requests, or a ``RequestError`` (503 when the queue is full;
        400 naming ``field`` when they could never fit)."""
        self.check_admitting()
        if count > self.capacity:
            raise RequestError(
                f"{field}: {count} inputs at once; this server takes at most {self.capacity} "
                "(jaxformer serve --slots, --queue-size)",
                field,
            )
        if self.in_engine + count > self.capacity:
            raise RequestError(
                f"the server is busy ({self.in_engine} requests in flight, at most "
                f"{self.capacity}); retry later",
                status=503,
            )
        self.in_engine += count
        try:
            yield
        finally:
            self.in_engine -= count

    def seed(self, given) -> int:
        """A sampling request's seed: the one it gave, else the default one or a fresh one."""
        if given is not None:
            return given
        return secrets.randbelow(2**31) if self.random_seeds else self.served.defaults.seed

    def submit(self, inputs: Sequence[int], options, field: str) -> Handle:
        """``engine.submit``, its refusals as ``RequestError``s naming ``field`` (the input) or the
        option at fault."""
        from jaxformer.serving.requests import field_of

        try:
            handle = self.engine.submit(inputs, options)
        except ValueError as error:
            message = str(error)
            at = field if message.startswith("inputs") else field_of(message) or field
            raise RequestError(message.replace("inputs", field, 1), at) from None
        except RuntimeError as error:  # closed
            raise RequestError(str(error), status=503) from None
        self.metrics.decoded.labels(str(options.beam_size)).inc()
        self.metrics.input_tokens.inc(len(inputs))
        return handle


def _with(options, **changes):
    import dataclasses

    return dataclasses.replace(options, **changes)


async def result_of(handle: Handle):
    """The handle's result; cancelling the awaiting task cancels the request. Raises
    ``EngineStopped`` if the engine cancelled it."""
    try:
        return await asyncio.wrap_future(handle.future)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            handle.cancel()
            raise
        raise EngineStopped("the engine stopped before the request finished") from None


async def until_disconnected(request: Request, work: Awaitable):
    """``await work``, cancelled if the client disconnects first (then ``ClientGone``)."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone


async def read_body(request: Request, forms: bool = False) -> dict:
    """The request's fields: a JSON object, or (``forms``) a URL-encoded or multipart form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if forms and kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        return {key: value for key, value in form.multi_items()}
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def busy_headers(error: RequestError) -> dict:
    return {"Retry-After": str(RETRY_AFTER)} if error.status == 503 else {}


# The routes every server has.
def health(state: ServerState):
    async def route(request: Request) -> Response:
        if state.failed is not None:
            return JSONResponse({"status": "failed", "error": repr(state.failed)}, 500)
        if state.draining:
            status = "draining"
        elif not state.ready:
            status = "starting"
        else:
            return JSONResponse({"status": "ok", "model": state.served.name})
        headers = {"Retry-After": str(RETRY_AFTER)}
        return JSONResponse({"status": status}, 503, headers=headers)

    return route


def metrics(state: ServerState):
    from prometheus_client import CONTENT_TYPE_LATEST

    async def route(request: Request) -> Response:
        return Response(state.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return route


class Accounting:
    """ASGI middleware: HTTP requests in flight, counted by route and status code, and timed."""

    def __init__(self, app, state: ServerState, routes: set[str]):
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, route = self.state, scope["path"] if scope["path"] in self.routes else "other"
        started, status = time.perf_counter(), [499]  # 499: the client left before an answer

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        state.in_flight += 1
        state.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            state.in_flight -= 1
            state.metrics.in_flight.dec()
            state.metrics.http.labels(route, str(status[0])).inc()
            state.metrics.latency.labels(route).observe(time.perf_counter() - started)


__all__ = [
    "ClientGone",
    "EngineStopped",
    "ServerState",
    "read_body",
    "result_of",
    "until_disconnected",
]
