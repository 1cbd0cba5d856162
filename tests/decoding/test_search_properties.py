"""Search invariants on real models and toy ones: beam 1 == greedy, ordering, early exit, sampling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxformer import decoding as dec
from jaxformer import generate

from helpers import Transformer, make, source_batch
from reference_search import toy_model
from toy import initial_state, jax_toy_step_fn


@pytest.fixture(scope="session")
def model_and_params():
    return make(Transformer, maximum_relative_position=4)


def toy(seed=0, batch=3, vocab=7, max_length=8, eos_bias=1.5):
    _, _, params = toy_model(
        seed, V=vocab, S=4, M=5, T_max=max_length, B=batch, eos_id=2, eos_bias=eos_bias
    )
    return jax_toy_step_fn(params), initial_state(params, batch), jnp.ones([batch], jnp.int32)


def test_beam_of_one_equals_greedy(model_and_params):
    model, params = model_and_params
    src = source_batch()
    kwargs = dict(start_id=1, end_id=5, max_length=10, min_length=1, return_attention=True)
    greedy = generate(model, params, src, **kwargs)
    beam = generate(model, params, src, strategy=dec.BeamSearch(1, 0.6, 0.3), **kwargs)
    # Scores differ (the beam's carry its length penalty); the hypotheses are the same.
    for field in ("ids", "lengths", "log_probs", "attention"):
        np.testing.assert_allclose(getattr(greedy, field), getattr(beam, field), atol=1e-6)


def test_hypotheses_come_best_first_and_score_their_own_ids(model_and_params):
    model, params = model_and_params
    src = source_batch()
    result = generate(
        model,
        params,
        src,
        start_id=1,
        end_id=5,
        max_length=10,
        strategy=dec.BeamSearch(4, length_penalty=0.6),
    )
    scores = np.asarray(result.scores)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # With only a length penalty, the final score is log_prob / lp(length) (EOS counted once, and the
    # one-step lag of finished hypotheses that OpenNMT-tf's formula has).
    lengths = np.asarray(result.lengths)
    finished = (np.asarray(result.ids) == 5).any(-1)
    lp_len = np.where(
        finished, lengths + 2, lengths
    )  # finished: len incl. EOS, +1 at the next step
    lp = ((5.0 + lp_len) / 6.0) ** 0.6
    np.testing.assert_allclose(scores, np.asarray(result.log_probs) / lp, rtol=1e-5)


@pytest.mark.parametrize("strategy", [dec.GreedySearch(), dec.BeamSearch(3, 0.2, 0.2)])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_early_exit_gives_identical_results(strategy, chunk_size):
    step_fn, state, start = toy(max_length=9)
    kwargs = dict(strategy=strategy, max_length=9, attention_size=4, return_attention=True)
    plain = dec.dynamic_decode(step_fn, start, 2, state, chunk_size=None, **kwargs)  # one scan
    early = dec.dynamic_decode(step_fn, start, 2, state, chunk_size=chunk_size, **kwargs)
    assert int(plain.steps) < 9  # everything finished early: the exit is exercised
    for a, b in zip(plain[:6], early[:6], strict=True):
        np.testing.assert_array_equal(a, b)


def test_steps_after_everything_finished_change_nothing():
    step_fn, state, start = toy(max_length=12)
    kwargs = dict(strategy=dec.BeamSearch(3, 0.6, 0.4), attention_size=4, return_attention=True)
    short = dec.dynamic_decode(step_fn, start, 2, state, max_length=12, **kwargs)
    steps = int(short.steps)
    assert steps < 12
    # Running exactly the steps it needed gives the same hypotheses.
    exact = dec.dynamic_decode(step_fn, start, 2, state, max_length=steps, **kwargs)
    np.testing.assert_array_equal(short.ids[..., :steps], exact.ids)
    np.testing.assert_array_equal(short.ids[..., steps:], 2)
    np.testing.assert_array_equal(short.scores, exact.scores)
    np.testing.assert_array_equal(short.log_probs, exact.log_probs)


def test_n_best_returns_the_top_hypotheses():
    step_fn, state, start = toy()
    full = dec.dynamic_decode(step_fn, start, 2, state, strategy=dec.BeamSearch(4), max_length=8)
    top2 = dec.dynamic_decode(
        step_fn, start, 2, state, strategy=dec.BeamSearch(4, num_hypotheses=2), max_length=8
    )
    chex.assert_shape(top2.ids, (3, 2, 8))
    np.testing.assert_array_equal(top2.ids, full.ids[:, :2])
    np.testing.assert_array_equal(top2.scores, full.scores[:, :2])


def sample_many(sampler, scores, n, key):
    keys = jax.random.split(key, n)
    ids, _ = jax.vmap(lambda k: sampler(scores, 1, k))(keys)
    return np.asarray(ids).reshape(-1)


@pytest.mark.parametrize("topk, temperature", [(3, 0.5), (0, 1.0), (5, 2.0)])
def test_sampled_frequencies_follow_the_topk_temperature_distribution(topk, temperature):
    scores = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (1, 8)) * 2)
    sampler = dec.RandomSampler(topk=topk, temperature=temperature)
    draws = sample_many(sampler, scores, 20000, jax.random.key(2))
    logits = np.asarray(scores[0], np.float64) / temperature
    if topk:
        logits[np.argsort(-logits)[topk:]] = -np.inf
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    counts = np.bincount(draws, minlength=8)
    assert counts[expected == 0].sum() == 0  # nothing outside the top k
    support = expected > 0
    _, p_value = stats.chisquare(counts[support], expected[support] * counts.sum())
    assert p_value > 1e-3
    # The check can fail: the untempered distribution is rejected when the temperature matters.
    if temperature != 1.0:
        plain = np.exp(np.asarray(scores[0], np.float64))
        plain = np.where(support, plain, 0) / np.where(support, plain, 0).sum()
        assert stats.chisquare(counts[support], plain[support] * counts.sum())[1] < 1e-6


def test_nucleus_sampling_keeps_only_the_nucleus():
    probs = jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]])
    sampler = dec.RandomSampler(top_p=0.75)
    draws = sample_many(sampler, jnp.log(probs), 4000, jax.random.key(3))
    assert set(np.unique(draws)) == {0, 1}  # 0.5 + 0.3 >= 0.75: the rest never appears


def test_sampling_without_replacement_gives_distinct_candidates():
    sampler = dec.RandomSampler(topk=4, with_replacement=False)
    scores = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.05, 0.05]] * 50))
    ids, picked = sampler(scores, 4, jax.random.key(4))
    assert all(len(set(row)) == 4 for row in np.asarray(ids))
    np.testing.assert_array_equal(picked, jnp.take_along_axis(scores, ids, axis=-1))


def test_same_key_same_samples_other_key_other_samples():
    step_fn, state, start = toy(eos_bias=0.0)
    run = lambda key, strategy: dec.dynamic_decode(
        step_fn,
        start,
        2,
        state,
        strategy=strategy,
        sampler=dec.RandomSampler(topk=5, temperature=1.5),
        max_length=8,
        rng=key,
    )
    for strategy in (dec.GreedySearch(), dec.BeamSearch(3)):
        a, b = run(jax.random.key(5), strategy), run(jax.random.key(5), strategy)
        c = run(jax.random.key(6), strategy)
        np.testing.assert_array_equal(a.ids, b.ids)
        assert not np.array_equal(a.ids, c.ids)


def test_trace_returns_the_tensors_of_each_step():
    step_fn, state, start = toy(batch=2)
    result = dec.dynamic_decode(
        step_fn,
        start,
        2,
        state,
        strategy=dec.BeamSearch(2, 0.2, 0.2),
        max_length=4,
        attention_size=4,
        trace=True,
    )
    t = result.trace
    chex.assert_shape([t["log_probs"], t["total_probs"], t["scores"]], (4, 4, 7))
    chex.assert_shape([t["word_ids"], t["beam_ids"], t["beam_indices"]], (4, 4))
    chex.assert_shape(t["accumulated_attention"], (4, 4, 4))
    # Step 0: only the first beam of each entry is alive ([0, -inf] initial log-probs).
    assert np.all(np.isneginf(np.asarray(t["total_probs"][0, 1::2])))
    np.testing.assert_array_equal(t["beam_ids"][0], 0)
    ran = int(result.steps)  # steps skipped after everything finished record zeros
    np.testing.assert_array_equal(
        t["beam_indices"][:ran], (np.arange(4) // 2) * 2 + np.asarray(t["beam_ids"][:ran])
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy=dec.BeamSearch(8)), "beam_size"),
        (dict(sampler=dec.RandomSampler(topk=9), rng=jax.random.key(0)), "topk"),
        (dict(sampler=dec.RandomSampler(topk=2)), "rng"),
        (dict(max_length=0), "max_length"),
        (dict(min_length=9), "min_length"),
        (dict(strategy=dec.BeamSearch(2, coverage_penalty=0.2)), "attention_size"),
        (dict(return_attention=True, attention_size=3), "attention_size"),
        (dict(compat="opennmt"), "compat"),
    ],
)
def test_bad_arguments_are_refused_at_trace_time(kwargs, message):
    step_fn, state, start = toy()
    kwargs = {"max_length": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        dec.dynamic_decode(step_fn, start, 2, state, **kwargs)


def test_bad_end_id_and_sampler_options_are_refused():
    step_fn, state, start = toy()
    with pytest.raises(ValueError, match="end_id"):
        dec.dynamic_decode(step_fn, start, 7, state, max_length=4)
    with pytest.raises(ValueError, match="start_ids"):
        dec.dynamic_decode(step_fn, start + 6, 2, state, max_length=4)
    with pytest.raises(ValueError, match="temperature"):
        dec.RandomSampler(temperature=0.0)
    with pytest.raises(ValueError, match="beam_size"):
        dec.BeamSearch(0)


def test_temperature_changes_per_call_without_recompiling(model_and_params):
    from jaxformer.decoding.generation import _run

    model, params = model_and_params
    src = source_batch()
    before = _run._cache_size()
    outputs = [
        generate(
            model,
            params,
            src,
            start_id=1,
            end_id=5,
            max_length=8,
            sampler=dec.RandomSampler(topk=8, temperature=temperature),
            rng=jax.random.key(0),
        ).ids
        for temperature in (0.3, 3.0, 3.0)
    ]
    assert _run._cache_size() == before + 1
    np.testing.assert_array_equal(outputs[1], outputs[2])
    assert not np.array_equal(outputs[0], outputs[1])
