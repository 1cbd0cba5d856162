"""The fast pickers of ``BestSampler`` equal ``jnp.argmax`` / ``jax.lax.top_k``, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.decoding.samplers import BestSampler, _first_maximum, _grouped_top_k


def tied_scores(seed, rows, candidates, levels):
    """Scores drawn from only ``levels`` distinct values (so most rows have ties), -inf included."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([[-np.inf], rng.normal(size=levels - 1)]).astype(np.float32)
    return jnp.asarray(values[rng.integers(0, levels, (rows, candidates))])


@pytest.mark.parametrize("candidates, levels", [(7, 3), (64, 5), (1000, 50), (96, 2)])
def test_first_maximum_is_argmax(candidates, levels):
    for seed in range(3):
        scores = tied_scores(seed, 9, candidates, levels)
        ids, best = _first_maximum(scores)
        np.testing.assert_array_equal(ids[:, 0], jnp.argmax(scores, axis=-1))
        np.testing.assert_array_equal(best[:, 0], jnp.max(scores, axis=-1))


def test_first_maximum_of_an_all_minus_inf_row_is_the_first_id():
    ids, best = _first_maximum(jnp.full([2, 5], -jnp.inf))
    np.testing.assert_array_equal(ids[:, 0], [0, 0])
    assert np.all(np.isneginf(best))


@pytest.mark.parametrize(
    "k, candidates, levels", [(2, 40, 3), (3, 300, 4), (4, 4 * 50, 6), (5, 5 * 97, 40), (4, 9, 2)]
)
def test_grouped_top_k_is_top_k(k, candidates, levels):
    for seed in range(3):
        scores = tied_scores(seed, 6, candidates, levels)
        ids, top = _grouped_top_k(scores, k)
        want_top, want_ids = jax.lax.top_k(scores, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(top, want_top)


def test_best_sampler_uses_them():
    scores = tied_scores(0, 4, 4 * 30, 5)
    ids, top = BestSampler()(scores, 4)
    want_top, want_ids = jax.lax.top_k(scores, 4)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(top, want_top)
    ids, top = BestSampler()(scores, 1)
    np.testing.assert_array_equal(ids[:, 0], jnp.argmax(scores, axis=-1))
    np.testing.assert_array_equal(top[:, 0], jnp.max(scores, axis=-1))
