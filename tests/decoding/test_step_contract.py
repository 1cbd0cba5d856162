"""``dynamic_decode`` checks the step function against its contract before running the loop.

Each wrong step function is refused with a message that names what is wrong (it used to fail deep
inside ``lax.scan``, or worse, run: logits with fewer rows than the search were broadcast and every
row got row 0's hypothesis). Also: scalar state leaves are allowed, and the step is traced once (the
shape probe's trace serves the loop body), whatever ``max_length`` and ``chunk_size``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding as dec

from helpers import as_a_user

V, B = 8, 2


def bigram_step(ids, step, state):
    """A deterministic toy model: the next token is ``(id + 1) % V``, EOS (0) after token 5."""
    logits = jax.nn.one_hot((ids + 1) % V, V) * 10.0  # [R, V]
    return logits, state


def counting_step(ids, step, state):
    logits, _ = bigram_step(ids, step, state)
    return logits, {"calls": state["calls"] + 1, "per_row": state["per_row"]}


BAD_STEPS = [
    ("fewer rows", lambda ids, t, s: (jnp.zeros([1, V]), s), r"logits of shape \(1, 8\); expected \[2, V\]"),
    ("one-dimensional logits", lambda ids, t, s: (jnp.zeros([V]), s), r"logits of shape \(8,\); expected \[2, V\]"),
    ("state changes shape", lambda ids, t, s: (jnp.zeros([B, V]), s[:1]), r"same structure, shapes and dtypes"),
    ("state changes dtype", lambda ids, t, s: (jnp.zeros([B, V]), s.astype(jnp.int32)), r"same structure, shapes and dtypes"),
    ("four outputs", lambda ids, t, s: (jnp.zeros([B, V]), s, None, None), r"must return \(logits, state\)"),
]  # fmt: skip


@pytest.mark.parametrize("step, message", [c[1:] for c in BAD_STEPS], ids=[c[0] for c in BAD_STEPS])
def test_a_step_function_that_breaks_the_contract_is_refused(step, message):
    with pytest.raises((ValueError, TypeError), match=message), as_a_user():
        dec.dynamic_decode(step, jnp.ones([B], jnp.int32), 0, jnp.zeros([B, 3]), max_length=4)


def test_start_ids_must_be_one_token_per_row():
    with (
        pytest.raises(ValueError, match=r"start_ids must be int32\[B\].*got shape \(2, 1\)"),
        as_a_user(),
    ):
        dec.dynamic_decode(bigram_step, np.ones([B, 1], np.int32), 0, None, max_length=4)


def test_a_state_leaf_without_the_batch_axis_first_is_named():
    state = {"cache": jnp.zeros([B, 4]), "oops": jnp.zeros([3, 4])}
    with pytest.raises(ValueError, match=r"initial_state\['oops'\].*2 rows.*\(3, 4\)"):
        dec.dynamic_decode(bigram_step, jnp.ones([B], jnp.int32), 0, state, max_length=4)


@pytest.mark.parametrize("strategy", [dec.GreedySearch(), dec.BeamSearch(3)])
def test_scalar_state_leaves_are_kept_as_they_are(strategy):
    """A scalar has no batch axis: the search neither tiles nor reorders it (a step counter here)."""
    state = {"calls": jnp.int32(0), "per_row": jnp.arange(B, dtype=jnp.float32)}
    result = dec.dynamic_decode(
        counting_step, jnp.asarray([1, 3], jnp.int32), 0, state, strategy=strategy,
        max_length=6, chunk_size=None,
    )  # fmt: skip
    # 1 -> 2 3 4 5 6 7, 3 -> 4 5 6 7 0 (EOS) ...: the toy model's continuation, best first.
    np.testing.assert_array_equal(result.ids[0, 0], [2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(result.ids[1, 0, :5], [4, 5, 6, 7, 0])


@pytest.mark.parametrize("max_length, chunk_size", [(13, 8), (16, 8), (5, None), (3, 8)])
def test_the_step_is_traced_once_whatever_the_length(max_length, chunk_size):
    """The probe's trace serves the loop body; no second trace for a last, shorter chunk."""
    traces = []

    def step(ids, t, state):
        traces.append(1)
        return bigram_step(ids, t, state)

    result = dec.dynamic_decode(
        step, jnp.ones([B], jnp.int32), 0, jnp.zeros([B]), max_length=max_length,
        chunk_size=chunk_size,
    )  # fmt: skip
    assert len(traces) == 1
    assert result.ids.shape == (B, 1, max_length)
