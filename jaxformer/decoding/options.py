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
    """A finite real number ``>= 0`` (``> 0`` with ``positive``), else a ``ValueError``.

    ``inf`` is refused like ``nan``: an infinite length penalty or temperature does not raise in the
    search, it quietly returns one-token or empty outputs."""
    allowed = "a finite number > 0" if positive else "a finite number >= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return float(value)


def require_probability(name: str, value) -> float:
    """A number in ``(0, 1]`` (a nucleus mass), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _is_data(value) -> bool:
    """An array or a tracer (an option passed as data, checked by whoever made it)."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def check_lengths(max_length, min_length) -> None:
    require_int("max_length", max_length, 1)
    if _is_data(min_length) and np.ndim(min_length) == 0:
        return  # data (generate and the serving engine check theirs before tracing)
    if not _is_int(min_length):
        raise ValueError(
            f"min_length must be an int in [0, max_length={max_length}], got {min_length!r}"
        )
    if not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be in [0, max_length={max_length}], got {min_length}")


def check_types(strategy, sampler) -> None:
    """A strategy and a sampler by what they do (``strategies.py``, ``samplers.py`` import this
    module, not the other way round)."""
    if not all(hasattr(strategy, name) for name in ("width", "select", "initial_log_probs")):
        raise TypeError(f"strategy must be GreedySearch() or BeamSearch(...), got {strategy!r}")
    if not callable(sampler) or not hasattr(sampler, "needs_rng"):
        raise TypeError(f"sampler must be BestSampler() or RandomSampler(...), got {sampler!r}")


def check_end_ids(end_id) -> tuple:
    """``end_id`` (an int, or a tuple / list of distinct ints: any of them ends a hypothesis) as
    a tuple; the first is the one written after a hypothesis's end. The ids' values are checked
    against the vocabulary by ``check_vocabulary``."""
    ids = tuple(end_id) if isinstance(end_id, tuple | list) else (end_id,)
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(
            f"end_id must be an int or a non-empty tuple of distinct ints, got {end_id!r}"
        )
    return ids


def static_end_id(end_id) -> int | tuple[int, ...]:
    """``end_id`` in one canonical hashable form (an int when it is one id): a static argument."""
    ids = check_end_ids(end_id)
    return ids[0] if len(ids) == 1 else ids


def check_search(strategy, sampler, *, max_length, min_length, compat, rng) -> None:
    """The options every search takes, checked before anything is traced."""
    check_types(strategy, sampler)
    check_lengths(max_length, min_length)
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    if sampler.needs_rng and rng is None:
        raise ValueError(f"{type(sampler).__name__} needs rng=jax.random.key(...)")


def check_vocabulary(vocab: int, strategy, sampler, **ids) -> None:
    """Ids (``end_id=...``, ``start_id=...``; None skipped; a tuple: each of its ids), the beam
    width and top-k against V."""
    for name, value in ids.items():
        if value is None:
            continue
        for one in value if isinstance(value, tuple) else (value,):
            if not _is_int(one):
                raise ValueError(f"{name} must be an int in [0, {vocab}), got {value!r}")
            if not 0 <= one < vocab:
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


def check_repetition(repetition_penalty, no_repeat_ngram_size) -> None:
    """CTRL's penalty θ (a finite number > 0; 1 is off) and the no-repeat n-gram size (0 is off)."""
    require_number("repetition_penalty", repetition_penalty, positive=True)
    require_int("no_repeat_ngram_size", no_repeat_ngram_size, 0)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        require_int("chunk_size", chunk_size, 1)


def check_suppress_ids(suppress_ids, vocab: int, end_id) -> tuple[int, ...]:
    """``suppress_ids`` as a tuple of distinct ids in ``[0, vocab)``, none of them ``end_id``
    (or one of its ids)."""
    allowed = f"a tuple of token ids in [0, {vocab}) other than end_id={end_id}"
    if not isinstance(suppress_ids, tuple | list) or not all(_is_int(i) for i in suppress_ids):
        raise ValueError(f"suppress_ids must be {allowed}, got {suppress_ids!r}")
    outside = [i for i in suppress_ids if not 0 <= i < vocab]
    if outside:
        raise ValueError(
            f"suppress_ids: {outside} outside the target vocabulary [0, {vocab}); "
            f"allowed: {allowed}"
        )
    if set(check_end_ids(end_id)) & set(suppress_ids):
        raise ValueError(
            f"suppress_ids must not contain end_id={end_id} (a hypothesis could never end; use "
            "min_length to delay EOS)"
        )
    return tuple(sorted({int(i) for i in suppress_ids}))


def check_target_prefix(
    target_prefix, *, batch: int, vocab: int, end_id: int | tuple[int, ...], max_length: int
):
    """``target_prefix`` as int32 ``[batch, P]`` (a jax array; None for None or P = 0).

    ``P < max_length`` (at least one step is free); concrete ids must be in ``[0, vocab)`` and
    differ from ``end_id``. A traced prefix (inside ``jax.jit``) is checked for its shape only.
    """
    import jax
    import jax.numpy as jnp

    if target_prefix is None:
        return None
    if isinstance(target_prefix, jax.core.Tracer):
        array = target_prefix
    else:
        try:
            array = np.asarray(target_prefix)
        except ValueError:  # ragged nested lists
            array = None
        if array is None or array.dtype == object:
            raise ValueError(
                f"target_prefix must be int32[{batch}, P] (or {batch} lists of P token ids each, "
                "all of the same length), got rows of different lengths"
            )
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"target_prefix must be integer token ids, got dtype {array.dtype}")
    shape = tuple(np.shape(array))
    if len(shape) != 2 or shape[0] != batch:
        raise ValueError(
            f"target_prefix must be int32[{batch}, P] (one row of P forced tokens per batch entry, "
            f"batch {batch}), got shape {shape}"
        )
    length = shape[1]
    if length == 0:
        return None
    if length >= max_length:
        raise ValueError(
            f"target_prefix has P={length} tokens per row; P must be < max_length={max_length} "
            f"(max_length counts the prefix and at least one token must be free)"
        )
    if not isinstance(array, jax.core.Tracer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"target_prefix ids must be in [0, {vocab}) (the target vocabulary), got values "
                f"in [{low}, {high}]"
            )
        if np.isin(array, check_end_ids(end_id)).any():
            raise ValueError(
                f"target_prefix must not contain end_id={end_id} (a forced EOS would end the "
                "hypothesis inside its prefix)"
            )
    return jnp.asarray(array, jnp.int32)
