"""Every check of a decoding option, in one place.

``dynamic_decode``, ``generate``, the strategies and samplers, text inference (``DecodeOptions``) and
the CLI all call these, so an option is refused with the same message wherever it is given: the
parameter's name, what is allowed, and what was given. Checks run in Python, before tracing.
"""

from __future__ import annotations

import numbers

import numpy as np

COMPAT_MODES = (None, "opennmt-tf")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_int(
    name: str, value, low: int | None = None, high: int | None = None, high_name: str = ""
) -> int:
    """``value`` as an int in ``[low, high]`` (either bound may be open), else a ``ValueError``.

    ``high_name`` names where the upper bound comes from (``"beam_size"``: ``[1, beam_size=4]``).
    """
    if low is not None and high is not None:
        allowed = f"an int in [{low}, {high_name + '=' if high_name else ''}{high}]"
    elif low is not None:
        allowed = f"an int >= {low}"
    else:
        allowed = "an int"
    if not _is_int(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


def require_number(name: str, value, *, positive: bool = False) -> float:
    """A real number ``>= 0`` (``> 0`` with ``positive``), else a ``ValueError``."""
    allowed = "a number > 0" if positive else "a number >= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or np.isnan(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return float(value)


def check_lengths(max_length, min_length) -> None:
    require_int("max_length", max_length, 1)
    if not _is_int(min_length):
        raise ValueError(
            f"min_length must be an int in [0, max_length={max_length}], got {min_length!r}"
        )
    if not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be in [0, max_length={max_length}], got {min_length}")


def check_types(strategy, sampler) -> None:
    from jaxformer.decoding.strategies import BeamSearch, GreedySearch

    if not isinstance(strategy, GreedySearch | BeamSearch):
        raise TypeError(f"strategy must be GreedySearch() or BeamSearch(...), got {strategy!r}")
    if not callable(sampler) or not hasattr(sampler, "needs_rng"):
        raise TypeError(f"sampler must be BestSampler() or RandomSampler(...), got {sampler!r}")


def check_search(strategy, sampler, *, max_length, min_length, compat, rng) -> None:
    """The options every search takes, checked before anything is traced."""
    check_types(strategy, sampler)
    check_lengths(max_length, min_length)
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    if sampler.needs_rng and rng is None:
        raise ValueError(f"{type(sampler).__name__} needs rng=jax.random.key(...)")


def check_vocabulary(vocab: int, strategy, sampler, **ids) -> None:
    """Ids (``end_id=...``, ``start_id=...``; None skipped), the beam width and top-k against V."""
    for name, value in ids.items():
        if value is None:
            continue
        if not _is_int(value):
            raise ValueError(f"{name} must be an int in [0, {vocab}), got {value!r}")
        if not 0 <= value < vocab:
            raise ValueError(f"{name}={value} is outside the target vocabulary [0, {vocab})")
    if strategy.width > vocab:
        raise ValueError(f"beam_size={strategy.width} must be in [1, vocab_size={vocab}]")
    candidates = strategy.width * vocab
    topk = getattr(sampler, "topk", 0)
    if topk > candidates:
        raise ValueError(
            f"topk={topk} must be in [0, {candidates}] (0 = all; {strategy.width} beam(s) x "
            f"vocab_size {vocab} candidates)"
        )


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        require_int("chunk_size", chunk_size, 1)
