"""Length-bucketed batches: a run compiles one shape per bucket, not one per batch.

Every row is padded with ``PAD_ID`` (0) to its *bucket* length (the smallest boundary that holds it),
not to the longest row of its batch, and a short last batch of a bucket is filled up with all-pad
rows (``Batch.index == -1``) unless ``drop_remainder``. So the only shapes are
``[batch_size, src_bucket]`` x ``[batch_size, tgt_bucket]``: at most ``len(boundaries)**2`` pairs
(in practice src and tgt lengths correlate: KJV->Russian with powers of two 8..256 gives 20), or
``len(boundaries)`` with ``same_length=True`` (both padded to the larger bucket: more padding).

Row layout (``encode`` adds no specials; this module adds them)::

    src     = ids(src)                     [B, S]
    tgt_in  = BOS + ids(tgt)               [B, T]   decoder input (teacher forcing)
    tgt_out =       ids(tgt) + EOS         [B, T]   labels; mask = tgt_out != PAD_ID

Input checks, each an error that names the example's index (its position in the input list):

- **ids out of range**: an id outside ``[0, vocab_size)`` (when ``vocab_size`` is given) or equal to
  PAD/BOS/EOS (they would corrupt masks) is always an error.
- **empty lines**: ``empty="error"`` (default) or ``"drop"``. An example is empty when its source
  or its target has no tokens. An empty source would leave attention with nothing to attend to.
- **too long**: the limit is ``max_length`` tokens per row as batched (source ids; target ids + 1
  for BOS/EOS); it defaults to the largest boundary. ``too_long="error"`` (default), ``"drop"``
  (skipped, counted in ``BatchStats``), or ``"truncate"`` (source cut to ``max_length``, target to
  ``max_length - 1`` ids; the EOS is still appended, so a truncated target ends with EOS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from jaxformer.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS

TooLong = Literal["error", "truncate", "drop"]
Empty = Literal["error", "drop"]
TokenIds = Sequence[int] | np.ndarray
TokenPair = tuple[TokenIds, TokenIds]


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Padded lengths, ascending. A row of length n goes to the smallest boundary >= n."""

    boundaries: tuple[int, ...]

    def __post_init__(self):
        b = self.boundaries
        if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"bucket boundaries must be positive and increasing, got {b}")

    @classmethod
    def powers_of_two(cls, max_length: int, min_length: int = 8) -> Buckets:
        """``min_length, 2 min_length, ...`` up to and including the first boundary >= max_length."""
        out = [min_length]
        while out[-1] < max_length:
            out.append(out[-1] * 2)
        return cls(tuple(out))

    @classmethod
    def multiples(cls, step: int, max_length: int) -> Buckets:
        """``step, 2 step, ...`` up to the first multiple >= max_length."""
        return cls(tuple(range(step, max_length + step, step)))

    @property
    def max_length(self) -> int:
        return self.boundaries[-1]

    def length_for(self, n: int) -> int:
        idx = int(np.searchsorted(self.boundaries, max(n, 1)))
        if idx == len(self.boundaries):
            raise ValueError(f"length {n} exceeds the largest bucket {self.max_length}")
        return self.boundaries[idx]


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    batch_size: int
    buckets: Buckets
    max_length: int | None = None  # per-row token limit; None: buckets.max_length
    too_long: TooLong = "error"
    empty: Empty = "error"
    vocab_size: int | None = None  # when given, every id must be < vocab_size
    drop_remainder: bool = False  # False: fill short batches with all-pad rows (index -1)
    same_length: bool = (
        False  # True: source and target padded to one bucket, len(boundaries) shapes
    )

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.too_long not in ("error", "truncate", "drop"):
            raise ValueError(
                f"too_long must be 'error', 'truncate' or 'drop', got {self.too_long!r}"
            )
        if self.empty not in ("error", "drop"):
            raise ValueError(f"empty must be 'error' or 'drop', got {self.empty!r}")
        if self.max_length is not None and not 2 <= self.max_length <= self.buckets.max_length:
            raise ValueError(
                f"max_length {self.max_length} must be in [2, largest bucket "
                f"{self.buckets.max_length}]"
            )

    @property
    def limit(self) -> int:
        return self.max_length if self.max_length is not None else self.buckets.max_length


@dataclasses.dataclass(frozen=True)
class Batch:
    src: np.ndarray  # int32[B, S]  source ids, PAD after the end
    tgt_in: np.ndarray  # int32[B, T]  BOS + target ids
    tgt_out: np.ndarray  # int32[B, T]  target ids + EOS
    index: np.ndarray  # int32[B]     example index in the input list; -1 for a filler row

    @property
    def src_mask(self) -> np.ndarray:  # bool[B, S]
        return self.src != PAD_ID

    @property
    def tgt_mask(self) -> np.ndarray:  # bool[B, T]
        return self.tgt_out != PAD_ID

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.src.shape[0], self.src.shape[1], self.tgt_in.shape[1])


@dataclasses.dataclass(frozen=True)
class BatchStats:
    examples: int  # examples batched
    dropped_empty: int
    dropped_too_long: int
    truncated: int


def _check_ids(ids: TokenIds, index: int, side: str, vocab_size: int | None) -> list[int]:
    out = [int(i) for i in ids]
    for position, i in enumerate(out):
        if i in SPECIAL_IDS or i < 0 or (vocab_size is not None and i >= vocab_size):
            what = "a reserved special id (pad/bos/eos)" if i in SPECIAL_IDS else "out of range"
            raise ValueError(
                f"example {index}: {side} id {i} at position {position} is {what}"
                f" (vocab_size {vocab_size})"
            )
    return out


def prepare(
    pairs: Sequence[TokenPair], config: BatchConfig
) -> tuple[list[tuple[int, list[int], list[int]]], BatchStats]:
    """Checks every pair and applies the empty/too-long policies: ``[(index, src, tgt)]``, stats."""
    limit = config.limit
    kept, empty, too_long, truncated = [], 0, 0, 0
    for index, (src, tgt) in enumerate(pairs):
        src = _check_ids(src, index, "source", config.vocab_size)
        tgt = _check_ids(tgt, index, "target", config.vocab_size)
        if not src or not tgt:
            if config.empty == "error":
                side = "source" if not src else "target"
                raise ValueError(f"example {index}: empty {side} (use empty='drop' to skip it)")
            empty += 1
            continue
        if len(src) > limit or len(tgt) + 1 > limit:
            if config.too_long == "error":
                raise ValueError(
                    f"example {index} is too long: source {len(src)} tokens, target {len(tgt)}"
                    f" + 1 (BOS/EOS), limit max_length={limit}"
                    " (use too_long='truncate' or 'drop')"
                )
            if config.too_long == "drop":
                too_long += 1
                continue
            src, tgt = src[:limit], tgt[: limit - 1]
            truncated += 1
        kept.append((index, src, tgt))
    return kept, BatchStats(len(kept), empty, too_long, truncated)


def _pad(rows: Sequence[Sequence[int]], length: int, batch_size: int) -> np.ndarray:
    out = np.full((batch_size, length), PAD_ID, dtype=np.int32)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = ids
    return out


def bucket_batches(
    pairs: Sequence[TokenPair], config: BatchConfig, seed: int | None = 0
) -> tuple[list[Batch], BatchStats]:
    """Checked, bucketed, padded batches of ``(src_ids, tgt_ids)`` pairs.

    ``seed``: shuffles the examples inside each bucket and the order of the batches
    (deterministically); ``None`` keeps input order (for evaluation and translation: restore the
    order with ``Batch.index``).
    """
    kept, stats = prepare(pairs, config)
    groups: dict[tuple[int, int], list[tuple[int, list[int], list[int]]]] = {}
    for example in kept:
        _, src, tgt = example
        key = (config.buckets.length_for(len(src)), config.buckets.length_for(len(tgt) + 1))
        if config.same_length:
            key = (max(key), max(key))
        groups.setdefault(key, []).append(example)
    rng = np.random.default_rng(seed) if seed is not None else None
    batches = []
    for (s_len, t_len), examples in sorted(groups.items()):
        if rng is not None:
            examples = [examples[i] for i in rng.permutation(len(examples))]
        for start in range(0, len(examples), config.batch_size):
            chunk = examples[start : start + config.batch_size]
            if len(chunk) < config.batch_size and config.drop_remainder:
                continue
            b = config.batch_size
            index = np.full((b,), -1, dtype=np.int32)
            index[: len(chunk)] = [i for i, _, _ in chunk]
            batches.append(
                Batch(
                    src=_pad([s for _, s, _ in chunk], s_len, b),
                    tgt_in=_pad([[BOS_ID, *t] for _, _, t in chunk], t_len, b),
                    tgt_out=_pad([[*t, EOS_ID] for _, _, t in chunk], t_len, b),
                    index=index,
                )
            )
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches, stats


def lm_windows(ids: TokenIds, length: int, batch_size: int, seed: int | None = 0) -> np.ndarray:
    """Non-overlapping windows of a token stream for a language model: int32[N, B, length + 1].

    Row ``w`` is ``ids[w * length : w * length + length + 1]`` (inputs ``[:, :-1]``, labels
    ``[:, 1:]``); the tail that does not fill a window, and windows that do not fill the last batch,
    are dropped (so there is exactly one shape). ``seed`` shuffles the windows; ``None`` keeps order.
    """
    stream = np.asarray(ids, dtype=np.int32)
    n_windows = (len(stream) - 1) // length
    n_batches = n_windows // batch_size
    if n_batches == 0:
        raise ValueError(
            f"{len(stream)} tokens make {n_windows} windows of {length} + 1: "
            f"fewer than one batch of {batch_size}"
        )
    starts = np.arange(n_windows) * length
    if seed is not None:
        starts = np.random.default_rng(seed).permutation(starts)
    starts = starts[: n_batches * batch_size].reshape(n_batches, batch_size)
    return stream[starts[..., None] + np.arange(length + 1)]
