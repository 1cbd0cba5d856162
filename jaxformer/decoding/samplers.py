"""Samplers: pick ``num_samples`` candidates per row from a ``[rows, candidates]`` score matrix.

A sampler is a tiny frozen dataclass with one method. ``BestSampler`` takes the top scores (ties: lower
index first, as ``tf.nn.top_k`` and ``jax.lax.top_k`` do). ``RandomSampler`` follows OpenNMT-tf: keep the
top ``topk`` scores (all when 0), divide by the temperature, draw categorical samples *with replacement*;
``with_replacement=False`` draws distinct candidates instead (Gumbel-top-k), and ``top_p < 1`` keeps only
the nucleus (Holtzman et al. 2020) of the tempered top-k distribution.

Samplers are pytrees: options that change shapes or the algorithm (``topk``, ``with_replacement``,
whether there is a nucleus at all) are static; the temperature and ``top_p`` are data. A jitted
function that takes the sampler as an argument (``jaxformer.generate`` does) compiles once and serves
every temperature, and every ``top_p < 1`` (``top_p = 1`` without top-k samples in the vocabulary's
own order, a different draw from the same key than the sorted order a nucleus needs: that choice,
``nucleus``, is static).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxformer.decoding.options import require_number, require_probability
from jaxformer.typing import Array, Float, Int, PRNGKey


def _check_count(name: str, value: int, candidates: int):
    if value > candidates:
        raise ValueError(f"{name}={value} exceeds the {candidates} candidates to choose from")


def _first_maximum(scores: Float[Array, "R X"]) -> tuple[Int[Array, "R 1"], Float[Array, "R 1"]]:
    """The first maximum of each row (``top_k``'s tie rule) and its score.

    Same result as ``jnp.argmax`` for rows without NaN, written as max, equality and min-index:
    three reductions that XLA:CPU vectorises, where its argmax (a reduction over (value, index)
    pairs) is about 4x slower on ``[64, 32000]`` (issue 6's measurement).
    """
    best = jnp.max(scores, axis=-1, keepdims=True)  # [R, 1]
    index = jnp.arange(scores.shape[-1], dtype=jnp.int32)  # [X]
    ids = jnp.min(jnp.where(scores == best, index, scores.shape[-1]), axis=-1, keepdims=True)
    return jnp.minimum(ids, scores.shape[-1] - 1), best  # [R, 1] each (a NaN row: last id)


def _grouped_top_k(
    scores: Float[Array, "R X"], k: int
) -> tuple[Int[Array, "R k"], Float[Array, "R k"]]:
    """``jax.lax.top_k(scores, k)`` (ids, then scores), in two stages when that is cheaper.

    With ``X = k * G`` candidates (beam search: ``W`` beams x ``V`` words), the best k of a row are
    among the best k of each of its k contiguous groups, so a top-k per group followed by a top-k of
    the ``k * k`` survivors gives the same picks. Ties come out as in one ``top_k`` (lower index
    first): the survivors stay in group order, and within a group in index order. XLA:CPU's top_k
    over ``[16, 4 * 32000]`` takes about 2.5x longer in one stage.
    """
    rows, candidates = scores.shape
    if k == 1 or candidates % k or candidates // k < 2 * k:
        top_scores, ids = jax.lax.top_k(scores, k)
        return ids.astype(jnp.int32), top_scores
    group = candidates // k
    grouped = scores.reshape(rows, k, group)  # [R, X] -> [R, k, X/k]
    first_scores, first_ids = jax.lax.top_k(grouped, k)  # [R, k, k] each
    first_ids = first_ids + (jnp.arange(k, dtype=first_ids.dtype) * group)[None, :, None]
    top_scores, picks = jax.lax.top_k(first_scores.reshape(rows, k * k), k)  # [R, k] each
    ids = jnp.take_along_axis(first_ids.reshape(rows, k * k), picks, axis=-1)  # [R, k]
    return ids.astype(jnp.int32), top_scores


@struct.dataclass
class BestSampler:
    """Deterministic: the ``num_samples`` highest scores, best first."""

    needs_rng = False

    def __call__(
        self, scores: Float[Array, "R X"], num_samples: int, rng: PRNGKey | None = None
    ) -> tuple[Int[Array, "R n"], Float[Array, "R n"]]:
        _check_count("beam_size", num_samples, scores.shape[-1])
        if num_samples == 1:
            return _first_maximum(scores)
        return _grouped_top_k(scores, num_samples)


@struct.dataclass
class RandomSampler:
    """Sample from the top ``topk`` candidates (0: all) at ``temperature``.

    ``top_p`` (nucleus) and ``with_replacement=False`` (Gumbel-top-k, distinct picks) go beyond
    OpenNMT-tf; their defaults reproduce it. ``temperature`` and ``top_p`` may be traced scalars
    (checked only when they are Python numbers). ``nucleus`` (static) says whether ``top_p`` applies:
    by default, whether it is below 1; a traced ``top_p`` needs it said. With ``nucleus`` and a
    ``top_p`` of 1 nothing is cut, but the draw is from the candidates in sorted order.
    """

    topk: int = struct.field(pytree_node=False, default=0)
    temperature: Any = 1.0  # float, or a float32 scalar array
    top_p: Any = 1.0  # float, or a float32 scalar array
    with_replacement: bool = struct.field(pytree_node=False, default=True)
    nucleus: bool | None = struct.field(pytree_node=False, default=None)
    needs_rng = True

    def __post_init__(self):
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(
                f"RandomSampler: topk must be an int >= 0 (0 = all), got {self.topk!r}"
            )
        if isinstance(self.temperature, int | float):  # a traced temperature is data
            require_number("RandomSampler: temperature", self.temperature, positive=True)
        if isinstance(self.top_p, int | float):
            require_probability("RandomSampler: top_p", self.top_p)
            if self.nucleus is None:
                object.__setattr__(self, "nucleus", self.top_p < 1.0)
            elif not self.nucleus and self.top_p < 1.0:
                raise ValueError(f"RandomSampler: top_p={self.top_p} needs nucleus=True")

    def __call__(
        self, scores: Float[Array, "R X"], num_samples: int, rng: PRNGKey
    ) -> tuple[Int[Array, "R n"], Float[Array, "R n"]]:
        candidates = scores.shape[-1]
        _check_count("topk", self.topk, candidates)
        if not self.with_replacement:
            _check_count("beam_size (distinct samples)", num_samples, self.topk or candidates)
        if self.nucleus is None:
            raise ValueError(
                "RandomSampler: a traced top_p needs nucleus=True or False (whether the draw is "
                "from the sorted candidates is static)"
            )
        restrict = self.topk > 0 or self.nucleus
        if restrict:
            top_scores, top_ids = jax.lax.top_k(scores, self.topk or candidates)  # sorted
            logits = top_scores / self.temperature
        else:
            logits = scores / self.temperature
        if self.nucleus:
            probs = jax.nn.softmax(logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of better candidates
            logits = jnp.where(mass_before < self.top_p, logits, -jnp.inf)  # keeps at least one
        if self.with_replacement:
            picks = jax.random.categorical(
                rng, logits, axis=-1, shape=(num_samples, scores.shape[0])
            )
            picks = picks.T  # [R, n]
        else:
            gumbel = jax.random.gumbel(rng, logits.shape, logits.dtype)
            _, picks = jax.lax.top_k(logits + gumbel, num_samples)
        ids = jnp.take_along_axis(top_ids, picks, axis=-1) if restrict else picks
        ids = ids.astype(jnp.int32)
        return ids, jnp.take_along_axis(scores, ids, axis=-1)
