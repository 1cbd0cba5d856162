"""Running a server: its application (``make_app``: the API routes and ``app.py``'s) on uvicorn, with a
graceful shutdown.

uvicorn's own SIGTERM handling closes the listening socket at once (new clients get a refused
connection) and waits for the connections open. Here the first SIGTERM (or Ctrl-C) drains instead
(``ServerState.drain``): the socket stays open and new requests are answered 503 with
``Retry-After`` (load balancers retry them elsewhere) while every request in flight runs to its
end; then uvicorn stops, the application's lifespan closes the engine (``close(finish=True)``:
nothing it holds is dropped) and ``run`` returns 0. A second signal stops waiting: uvicorn shuts
down as it does by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

from jaxformer.serving.app import Accounting, ServerState, health, metrics

log = logging.getLogger("jaxformer.serve")
DRAIN_POLL = 0.05  # seconds between two looks at the requests in flight while draining


def make_app(state: ServerState) -> Starlette:
    """The application of a server: the translation API or the completions API, with ``/health``
    and ``/metrics``. Its lifespan warms the engine up (in the background: ``/health`` says when
    it is done) and, at shutdown, lets the engine finish what it holds."""
    if state.served.is_language_model:
        from jaxformer.serving.completions import routes
    else:
        from jaxformer.serving.libretranslate import routes

    every = [
        Route("/health", health(state), methods=["GET"]),
        Route("/metrics", metrics(state), methods=["GET"]),
        *routes(state),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        warming = asyncio.create_task(state.warm_up())
        try:
            yield
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await asyncio.to_thread(state.engine.close, True)

    app = Starlette(routes=every, lifespan=lifespan)
    app.add_middleware(Accounting, state=state, routes={r.path for r in every})
    app.state.server = state
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, whose first exit signal drains the application first."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:  # a second signal: shut down now
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()  # (uvicorn would raise it again)
            return
        self.state.drain()

    async def main_loop(self) -> None:
        watch = asyncio.ensure_future(self._exit_when_drained())
        try:
            await super().main_loop()
        finally:
            watch.cancel()

    async def _exit_when_drained(self) -> None:
        while not (self.state.draining and self.state.in_flight == 0):
            await asyncio.sleep(DRAIN_POLL)
        log.info("drained: every request answered; stopping")
        self.should_exit = True


def log_config(level: str) -> dict:
    """uvicorn's logging configuration, with the server's own logger (``jaxformer.serve``)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["jaxformer"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def run(state: ServerState, *, host: str = "127.0.0.1", port: int = 8000, log_level="info") -> int:
    """Serve until a signal (above); the exit status: 0, or 1 if the engine failed to warm up."""
    config = uvicorn.Config(
        make_app(state),
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config(log_level),
        lifespan="on",
        timeout_graceful_shutdown=None,
    )
    server = _Server(config, state)

    def stop() -> None:
        server.should_exit = True

    state.request_exit = stop
    server.run()
    return 1 if state.failed is not None else 0


__all__ = ["run"]
