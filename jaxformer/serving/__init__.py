"""Serving: the continuous-batching engine (``engine.py``; its device side in ``pool.py``, what a
caller holds in ``handle.py``, files of inputs in ``files.py``).

The HTTP server on top of it is the next step (``shared/DESIGN.md``, "Serving").
"""

from jaxformer.serving.engine import Engine
from jaxformer.serving.files import engine_for
from jaxformer.serving.handle import Handle

__all__ = ["Engine", "Handle", "engine_for"]
