"""Model-agnostic search: greedy, sampling and beam search driven by a step function."""

from jaxformer.decoding.gather_tree import gather_tree, gather_tree_from_array
from jaxformer.decoding.loop import dynamic_decode
from jaxformer.decoding.result import DecodingResult
from jaxformer.decoding.samplers import BestSampler, RandomSampler
from jaxformer.decoding.strategies import BeamSearch, GreedySearch
from jaxformer.models.cache import tile_batch

__all__ = [
    "BeamSearch",
    "BestSampler",
    "DecodingResult",
    "GreedySearch",
    "RandomSampler",
    "dynamic_decode",
    "gather_tree",
    "gather_tree_from_array",
    "tile_batch",
]
