"""The repetition penalty and no-repeat n-grams: the formulas against plain loops, and the search.

Parity with Hugging Face and CTranslate2 on the trained fixtures is in test_huggingface_lm_options.py.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding as dec
from jaxformer.decoding import repetition


def _loop_penalty(logits, history, filled, theta):
    out = logits.copy()
    for r in range(logits.shape[0]):
        for v in set(history[r, : filled[r]].tolist()):
            out[r, v] = logits[r, v] / theta if logits[r, v] > 0 else logits[r, v] * theta
    return out


def _loop_banned(history, filled, n, vocab):
    banned = np.zeros((history.shape[0], vocab), bool)
    for r in range(history.shape[0]):
        tokens = history[r, : filled[r]].tolist()
        if len(tokens) < n - 1:
            continue
        last = tuple(tokens[len(tokens) - (n - 1) :]) if n > 1 else ()
        for j in range(len(tokens) - n + 1):
            if tuple(tokens[j : j + n - 1]) == last:
                banned[r, tokens[j + n - 1]] = True
    return banned


@pytest.mark.parametrize("seed", range(4))
def test_the_formulas_equal_plain_loops(seed):
    rng = np.random.default_rng(seed)
    rows, length, vocab = 5, 12, 7
    history = rng.integers(0, 4, (rows, length)).astype(np.int32)  # few ids: many repeats
    filled = rng.integers(0, length + 1, rows).astype(np.int32)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    seen = repetition.seen_tokens(jnp.asarray(history), jnp.asarray(filled), vocab)
    got = repetition.penalise_repetitions(jnp.asarray(logits), seen, 1.7)
    np.testing.assert_allclose(got, _loop_penalty(logits, history, filled, 1.7), rtol=1e-6)
    for n in (1, 2, 3, 4):
        got = repetition.banned_ngrams(jnp.asarray(history), jnp.asarray(filled), n, vocab)
        np.testing.assert_array_equal(got, _loop_banned(history, filled, n, vocab), err_msg=n)
        assert n > 2 or np.asarray(got).any()  # the cases ban something


# A "model" that always prefers to repeat: token 3 best, then 4, then 5 (no state).
V = 8


def _step(ids, step, state):
    prefs = jnp.array([0.0, 0.0, -9.0, 3.0, 2.5, 2.0, 1.0, 0.5])  # EOS (2) very unlikely
    return jnp.broadcast_to(prefs, (ids.shape[0], V)), state


@pytest.mark.parametrize("strategy", [dec.GreedySearch(), dec.BeamSearch(3)])
def test_no_repeat_ngrams_in_every_strategy(strategy):
    decode = lambda **kw: dec.dynamic_decode(
        _step, jnp.array([1, 6]), 2, strategy=strategy, max_length=6, **kw
    )
    plain = np.asarray(decode().ids[:, 0])
    assert (plain == 3).all()  # repeats forever without the option
    ids = np.asarray(decode(no_repeat_ngram_size=1).ids[:, 0])
    for b, start in enumerate((1, 6)):
        row = [start, *ids[b].tolist()]
        assert len(set(row)) == len(row), row  # no token twice, the start token included
    ids = np.asarray(decode(no_repeat_ngram_size=2).ids[:, 0])
    for b, start in enumerate((1, 6)):
        row = [start, *ids[b].tolist()]
        bigrams = list(itertools.pairwise(row))
        assert len(set(bigrams)) == len(bigrams), row


def test_the_history_starts_with_the_context():
    """An LM's whole prompt counts: a token of the context is banned at the first step."""
    context = (jnp.array([[3, 4, 5], [7, 7, 0]]), jnp.array([3, 2]))
    out = dec.dynamic_decode(
        _step, jnp.array([5, 7]), 2, max_length=1, no_repeat_ngram_size=1, context=context
    )
    assert out.ids[:, 0, 0].tolist() == [6, 3]  # 3, 4, 5 banned in row 0; only 7 in row 1


def test_the_repetition_penalty_moves_the_choice():
    # Seen tokens' logits / 1.6: 3 -> 1.875 < 2.5 (token 4): 4; then 4 -> 1.5625 < 2.0 (token 5):
    # 5; then 3 (1.875) beats 4 (1.5625), 5 (1.25) and 6 (1.0).
    out = dec.dynamic_decode(_step, jnp.array([3]), 2, max_length=3, repetition_penalty=1.6)
    assert out.ids[0, 0].tolist() == [4, 5, 3]
    # A penalty below 1 rewards repeats: the seen token wins even over a better one.
    prefer_four = lambda ids, step, s: (_step(ids, step, s)[0].at[:, 4].set(3.2), s)
    out = dec.dynamic_decode(prefer_four, jnp.array([3]), 2, max_length=2, repetition_penalty=0.9)
    assert out.ids[0, 0].tolist() == [3, 3]


def test_bad_values_are_refused():
    for kwargs, message in (
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an int >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            dec.dynamic_decode(_step, jnp.array([1]), 2, max_length=2, **kwargs)


def test_history_is_reordered_with_the_beams():
    """Beam search with no repeats on a random model equals a loop that checks every hypothesis."""
    table = jax.random.normal(jax.random.key(3), (V, V)) * 2.0
    step = lambda ids, t, s: (table[ids], s)  # a bigram model
    out = dec.dynamic_decode(
        step, jnp.array([1, 4]), 2, strategy=dec.BeamSearch(4), max_length=7,
        no_repeat_ngram_size=2,
    )  # fmt: skip
    for b, start in enumerate((1, 4)):
        for w in range(4):
            row = [start, *np.asarray(out.ids[b, w, : out.lengths[b, w]]).tolist()]
            bigrams = list(itertools.pairwise(row))
            assert len(set(bigrams)) == len(bigrams), (b, w, row)
