"""Serving: the continuous-batching engine (``engine.py``; its device side in ``pool.py``, what a
caller holds in ``handle.py``, files of inputs in ``files.py``), and ``jaxformer serve``, the HTTP
server on top of it (the ``serve`` extra: Starlette on uvicorn; not imported here).

The server: ``server.py`` runs uvicorn and drains on SIGTERM; ``app.py`` is what every route
shares (admission, readiness, disconnects, ``/health``, ``/metrics`` with ``metrics.py``);
``served.py`` the model, its tokenizers and its engine. LibreTranslate's API is
``libretranslate.py`` (with ``languages.py``), OpenAI's completions API ``completions.py`` (the
request), ``choices.py`` (its choices through the engine), ``events.py`` (streamed answers) and
``streams.py`` (text as tokens arrive, stop strings); ``requests.py`` turns a request's fields into
``DecodeOptions``.
"""

from jaxformer.serving.engine import Engine
from jaxformer.serving.files import engine_for
from jaxformer.serving.handle import Handle

__all__ = ["Engine", "Handle", "engine_for"]
