"""Serving: the continuous-batching engine (``engine.py``, its device side in ``pool.py``).

The HTTP server on top of it is the next step (``shared/DESIGN.md``, "Serving").
"""

from jaxformer.serving.engine import Engine, Handle

__all__ = ["Engine", "Handle"]
