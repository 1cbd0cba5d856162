"""Model-agnostic search: greedy, sampling and beam search driven by a step function.

- ``loop.py``: ``dynamic_decode``; ``strategies.py`` / ``samplers.py``: how a step picks; ``result.py``
  and ``gather_tree.py``: backtracking into hypotheses; ``options.py``: every option check.
- ``state.py``: the search-state protocol (tile to beams, reorder; shared state beside it).
- ``adapters.py``: one adapter per model family; ``generation.py``: ``generate``.
- ``texts.py``: text in, text out (tokenizers, batching by length, BLEU); ``baselines.py``: decoding
  without a cache, for comparison.
"""

from jaxformer.decoding.adapters import (
    Adapter,
    InputSpec,
    Prepared,
    adapter_for,
    register_adapter,
    step_function,
)
from jaxformer.decoding.gather_tree import gather_tree, gather_tree_from_array
from jaxformer.decoding.generation import CPU_COMPILER_OPTIONS, cpu_compiler_options, generate
from jaxformer.decoding.loop import dynamic_decode
from jaxformer.decoding.result import DecodingResult
from jaxformer.decoding.samplers import BestSampler, RandomSampler
from jaxformer.decoding.state import BeamState, reorder, tile_batch
from jaxformer.decoding.strategies import BeamSearch, GreedySearch

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "Adapter",
    "BeamSearch",
    "BeamState",
    "BestSampler",
    "DecodingResult",
    "GreedySearch",
    "InputSpec",
    "Prepared",
    "RandomSampler",
    "adapter_for",
    "cpu_compiler_options",
    "dynamic_decode",
    "gather_tree",
    "gather_tree_from_array",
    "generate",
    "register_adapter",
    "reorder",
    "step_function",
    "tile_batch",
]
