"""Prompts of different lengths in one batch: each row decodes as it does alone.

A ragged batch is right-padded; each row then continues at its own positions (``prompt_lengths - 1
+ step``), writing and reading its own cache slots. The Hourglass LM's own ragged tests are in
``test_hourglass.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding as dec
from jaxformer import generate
from jaxformer.decoding.adapters import step_function

from helpers import VARIANTS, DecoderOnlyLM, Transformer, as_a_user, make

END_ID = 2
SHORT, LONG, OTHER = [5, 9, 4], [7, 8, 6, 11, 12, 3], [13, 14, 15, 16, 17]
SEARCHES = {
    "greedy": dict(),
    "beam": dict(strategy=dec.BeamSearch(3, length_penalty=0.6)),
    "sampling": dict(sampler=dec.RandomSampler(topk=5), rng=jax.random.key(7)),
}


@pytest.fixture(scope="module", params=["pre_sinusoidal", "post_relative"])
def lm(request):
    model, params = make(DecoderOnlyLM, **VARIANTS[request.param])
    # Sharper distributions, so that the searches make real choices (no decision on float noise).
    params = {**params, "output": jax.tree.map(lambda w: 3 * w, params["output"])}
    return model, params


def decode(lm, prompts, search, **kwargs):
    model, params = lm
    return generate(
        model, params, prompts, end_id=END_ID, max_length=7, **SEARCHES[search], **kwargs
    )


def assert_same_row(result, row, alone, alone_row=0):
    np.testing.assert_array_equal(result.ids[row], alone.ids[alone_row])
    np.testing.assert_array_equal(result.lengths[row], alone.lengths[alone_row])
    np.testing.assert_allclose(result.log_probs[row], alone.log_probs[alone_row], atol=1e-5)
    np.testing.assert_allclose(result.scores[row], alone.scores[alone_row], atol=1e-5)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_each_row_of_a_ragged_batch_decodes_as_it_does_alone(lm, search):
    together = decode(lm, [SHORT, LONG, OTHER], search)
    for row, prompt in enumerate([SHORT, LONG, OTHER]):
        assert_same_row(together, row, decode(lm, [prompt], search))


def test_sampling_rows_do_not_depend_on_the_other_rows_lengths(lm):
    """Sampling keys are per step and row position: row 0 equals its batch of one, and any row is
    unchanged when the other rows' prompts change length."""
    first = decode(lm, [SHORT, LONG], "sampling")
    assert_same_row(first, 0, decode(lm, [SHORT], "sampling"))
    assert_same_row(first, 0, decode(lm, [SHORT, OTHER], "sampling"), 0)
    assert_same_row(first, 1, decode(lm, [OTHER, LONG], "sampling"), 1)
    assert_same_row(first, 1, decode(lm, [[9], LONG], "sampling"), 1)


def test_an_array_with_prompt_lengths_equals_the_list(lm):
    padded = np.zeros((2, 6), np.int32)
    padded[0, :3], padded[1] = SHORT, LONG
    listed = decode(lm, [SHORT, LONG], "beam")
    given = decode(lm, padded, "beam", prompt_lengths=[3, 6])
    np.testing.assert_array_equal(given.ids, listed.ids)
    # Without the lengths the padding is read as prompt tokens: another result (the check can fail).
    assert not np.array_equal(decode(lm, padded, "beam").ids[0], listed.ids[0])


def test_equal_lengths_take_the_shared_position_path(lm):
    """All prompts of the full width: ``generate`` uses one shared position (a scalar offset), and
    the per-row path (an offset per row, slots written by scatter) gives the same results."""
    model, params = lm
    padded = jnp.asarray([LONG, LONG[::-1]], jnp.int32)
    np.testing.assert_array_equal(
        decode(lm, padded, "greedy", prompt_lengths=[6, 6]).ids, decode(lm, padded, "greedy").ids
    )
    adapter = dec.adapter_for(model)
    results = []
    for lengths in (None, jnp.asarray([6, 6], jnp.int32)):
        prepared = adapter.prepare(params, padded, lengths, None, 7)
        assert jnp.ndim(prepared.state[1]) == (0 if lengths is None else 1)  # the offset
        results.append(
            dec.dynamic_decode(
                step_function(adapter, params), prepared.start_ids, END_ID, prepared.state,
                strategy=dec.BeamSearch(3), max_length=7,
            )
        )  # fmt: skip
    np.testing.assert_array_equal(results[0].ids, results[1].ids)
    np.testing.assert_allclose(results[0].log_probs, results[1].log_probs, atol=1e-5)


BAD_LENGTHS = [
    ([0, 3], r"prompt_lengths must be in \[1, 3\]"),
    ([4, 3], r"prompt_lengths must be in \[1, 3\]"),
    ([3], r"prompt_lengths must be 2 ints"),
    ([1.5, 3.0], r"prompt_lengths must be 2 ints"),
]


@pytest.mark.parametrize("lengths, message", BAD_LENGTHS)
def test_bad_prompt_lengths_are_refused(lm, lengths, message):
    model, params = lm
    with pytest.raises(ValueError, match=message), as_a_user():
        generate(model, params, np.full((2, 3), 5), end_id=END_ID, prompt_lengths=lengths)


def test_an_encoder_decoder_takes_ragged_sources_as_lists():
    model, params = make(Transformer)
    kwargs = dict(start_id=1, end_id=END_ID, max_length=6)
    listed = generate(model, params, [SHORT, LONG], **kwargs)
    padded = np.zeros((2, 6), np.int32)
    padded[0, :3], padded[1] = SHORT, LONG
    np.testing.assert_array_equal(listed.ids, generate(model, params, padded, **kwargs).ids)
    with pytest.raises(ValueError, match="prompt_lengths is for decoder-only LMs"), as_a_user():
        generate(model, params, padded, prompt_lengths=[3, 6], **kwargs)
