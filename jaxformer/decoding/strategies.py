"""Search strategies: how one step turns log-probabilities into the next tokens of every row.

Rows are laid out as OpenNMT-tf's ``tile_batch`` does: ``[b0w0, b0w1, ..., b1w0, ...]``, so ``R = B*W``.
A strategy is a small frozen pytree with ``initial_log_probs`` and ``select``; the loop in ``loop.py``
does everything the strategies share. As with the samplers, what fixes shapes or the program is
static (the beam width, how many hypotheses are returned, whether the coverage accumulator exists)
and the penalties are data: a Python number (a 0 penalty then costs nothing: ``dynamic_decode``
called with its defaults runs the arithmetic it always ran) or a traced float32 scalar (``generate``
passes its strategy as a jit argument, so one program serves every penalty; the serving engine
vmaps one strategy per request). A penalty of 0 as data leaves the scores as they are, bit for bit
(``x / 1.0 ** 0`` and ``x + 0 * cp`` with a finite ``cp``).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxformer.decoding.options import require_int, require_number
from jaxformer.typing import Array, Bool, Float, Int, PRNGKey


class Selection(NamedTuple):
    """What a strategy decided at one step (all ``[R]`` unless noted)."""

    word_ids: Int[Array, " R"]  # the token each row emits after the reorder
    beam_ids: Int[Array, " R"]  # parent beam within the batch entry, in 0..W-1
    beam_indices: Int[Array, " R"]  # parent row: (row // W) * W + beam_ids
    cum_log_probs: Float[Array, " R"]  # unpenalised cumulative log-prob of each new hypothesis
    scores: Float[Array, " R"]  # the score the sampler ranked by (penalties included)
    total_probs: Float[Array, "R V"]  # log_probs + cum, before the pick (for traces)
    penalised: Float[Array, "R V"]  # scores of every candidate, before the pick (for traces)
    accumulated_attention: (
        Float[Array, "R S"] | None
    )  # after this step's update, before the reorder


def concrete(value) -> bool:
    """Whether an option is a Python number (static) rather than data (an array or a tracer)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_zero(value) -> bool:
    """A static option known to be 0 (its arithmetic can be skipped); data is never skipped."""
    return concrete(value) and value == 0


@struct.dataclass
class GreedySearch:
    """One hypothesis per batch entry; the sampler picks from the step's log-probs."""

    width = 1
    num_hypotheses = 1
    uses_coverage = False

    def initial_log_probs(self, batch: int) -> Float[Array, " R"]:
        return jnp.zeros([batch], jnp.float32)

    def select(
        self,
        log_probs: Float[Array, "R V"],
        state: Any,
        attention: Float[Array, "R S"] | None,
        sampler,
        rng: PRNGKey | None,
    ) -> Selection:
        """The next word of every row; ``state`` is the loop's ``SearchState``."""
        ids, picked = sampler(log_probs, 1, rng)  # [R, 1] each
        word_ids, picked = ids[:, 0], picked[:, 0]
        # A finished row keeps its score (its forced EOS costs nothing anyway).
        cum_log_probs = state.cum_log_probs  # [R]
        cum = jnp.where(state.finished, cum_log_probs, cum_log_probs + picked)
        rows = jnp.arange(log_probs.shape[0], dtype=jnp.int32)
        total = log_probs + cum_log_probs[:, None]
        return Selection(word_ids, jnp.zeros_like(rows), rows, cum, cum, total, total, None)


@struct.dataclass
class BeamSearch:
    """Beam search with the GNMT length and coverage penalties (Wu et al. 2016), as in OpenNMT-tf.

    ``num_hypotheses`` (default: all ``beam_size``) is how many hypotheses per batch entry are returned.
    The penalties are numbers (checked here) or traced float32 scalars (data: see the module
    docstring). ``coverage`` says whether the search accumulates attention for the coverage penalty;
    by default, whether ``coverage_penalty`` is not 0 (a traced penalty needs it said).
    """

    beam_size: int = struct.field(pytree_node=False)
    length_penalty: Any = 0.0  # float, or a float32 scalar array
    coverage_penalty: Any = 0.0  # float, or a float32 scalar array
    num_hypotheses: int | None = struct.field(pytree_node=False, default=None)
    coverage: bool | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        require_int("BeamSearch: beam_size", self.beam_size, 1)
        if concrete(self.length_penalty):  # NaN and inf refused; data is checked by its maker
            require_number("BeamSearch: length_penalty", self.length_penalty)
        if concrete(self.coverage_penalty):
            require_number("BeamSearch: coverage_penalty", self.coverage_penalty)
            if self.coverage is None:
                object.__setattr__(self, "coverage", self.coverage_penalty != 0)
            elif not self.coverage and self.coverage_penalty != 0:
                raise ValueError(
                    f"BeamSearch: coverage_penalty={self.coverage_penalty} needs coverage=True"
                )
        n = self.num_hypotheses
        if n is not None and not 1 <= n <= self.beam_size:
            raise ValueError(f"BeamSearch: num_hypotheses must be in [1, beam_size], got {n}")
        if n is None:
            object.__setattr__(self, "num_hypotheses", self.beam_size)

    @property
    def width(self) -> int:
        return self.beam_size

    @property
    def uses_coverage(self) -> bool:
        if self.coverage is None:
            raise ValueError(
                "BeamSearch: a traced coverage_penalty needs coverage=True or False (whether the "
                "search keeps the attention accumulator is static)"
            )
        return self.coverage

    def initial_log_probs(self, batch: int) -> Float[Array, " R"]:
        """``[0, -inf, ..., -inf]`` per batch entry: only the first beam is alive at step 0."""
        first = np.full([self.beam_size], -np.inf, np.float32)
        first[0] = 0.0
        return jnp.tile(jnp.asarray(first), batch)

    def penalise(
        self,
        total: Float[Array, "R V"],
        lengths: Int[Array, " R"],
        finished: Bool[Array, " R"],
        accumulated_attention: Float[Array, "R S"] | None,
    ) -> Float[Array, "R V"]:
        scores = total
        if not is_zero(self.length_penalty):
            # GNMT: lp(Y) = ((5 + |Y|) / 6) ** alpha with |Y| = length after this step.
            lp = ((5.0 + (lengths + 1).astype(jnp.float32)) / 6.0) ** self.length_penalty  # [R]
            scores = scores / lp[:, None]
        if self.uses_coverage and not is_zero(self.coverage_penalty):
            # cp = beta * sum_j log(min(a_j, 1)); never-attended slots (exact 0) count as 1.
            acc = jnp.where(accumulated_attention == 0.0, 1.0, accumulated_attention)
            cp = jnp.sum(jnp.log(jnp.minimum(acc, 1.0)), axis=-1)  # [R]
            cp = cp * finished.astype(cp.dtype)  # only hypotheses finished before this step
            scores = scores + self.coverage_penalty * cp[:, None]
        return scores

    def select(
        self,
        log_probs: Float[Array, "R V"],
        state: Any,
        attention: Float[Array, "R S"] | None,
        sampler,
        rng: PRNGKey | None,
    ) -> Selection:
        """The next word and parent beam of every row; ``state`` is the loop's ``SearchState``."""
        rows, vocab = log_probs.shape
        width = self.beam_size
        accumulated_attention = state.accumulated_attention  # [R, S] or None
        if self.uses_coverage:
            live = (~state.finished).astype(attention.dtype)[:, None]
            accumulated_attention = accumulated_attention + attention * live  # [R, S]
        total = log_probs + state.cum_log_probs[:, None]  # [R, V]
        scores = self.penalise(total, state.lengths, state.finished, accumulated_attention)
        flat_scores = scores.reshape(rows // width, width * vocab)  # [R, V] -> [B, W*V]
        flat_total = total.reshape(rows // width, width * vocab)  # [B, W*V]
        ids, picked = sampler(flat_scores, width, rng)  # [B, W] each
        cum = jnp.take_along_axis(flat_total, ids, axis=-1).reshape(rows)  # [R]
        ids = ids.reshape(rows)
        word_ids = ids % vocab  # [R]
        beam_ids = ids // vocab  # [R]
        beam_indices = (jnp.arange(rows, dtype=jnp.int32) // width) * width + beam_ids  # [R]
        return Selection(
            word_ids,
            beam_ids,
            beam_indices,
            cum,
            picked.reshape(rows),
            total,
            scores,
            accumulated_attention,
        )
