"""Forced target prefixes and suppressed tokens (``generate(..., target_prefix=, suppress_ids=)``).

References are computed independently: teacher forcing with ``model.apply`` over the whole target
(start token, prefix, the tokens chosen so far), never through the search under test.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding as dec
from jaxformer import generate
from jaxformer.data.tokenizers import CharTokenizer
from jaxformer.decoding import options as opt
from jaxformer.decoding.texts import DecodeOptions, translate_texts
from jaxformer.models.encoder_decoder import Transformer

from helpers import DecoderOnlyLM, make, source_batch

START, END, MAX = 1, 2, 8
PREFIX = np.array([[5, 6], [7, 8], [9, 10]], np.int32)  # one row per source of source_batch()
SEARCHES = {
    "greedy": dict(),
    "beam": dict(strategy=dec.BeamSearch(3, length_penalty=0.6)),
    "sampling": dict(sampler=dec.RandomSampler(topk=5), rng=jax.random.key(3)),
    "beam_sampling": dict(
        strategy=dec.BeamSearch(3),
        sampler=dec.RandomSampler(with_replacement=False),
        rng=jax.random.key(4),
    ),
}


@pytest.fixture(scope="module")
def seq2seq():
    model, params = make(Transformer)
    # Sharper distributions, so that the searches make real choices (no decision on float noise).
    params = {**params, "output": jax.tree.map(lambda w: 3 * w, params["output"])}
    return model, params


def run(seq2seq, src=None, **kwargs):
    model, params = seq2seq
    src = source_batch() if src is None else src
    options = dict(start_id=START, end_id=END, max_length=MAX) | kwargs
    return generate(model, params, src, **options)


def teacher_forced_log_probs(seq2seq, src, targets, suppress=()):
    """``log p(targets[:, t] | start, targets[:, :t])`` ``[B, T]``, from one full decoder pass."""
    model, params = seq2seq
    tgt_in = jnp.concatenate([jnp.full((targets.shape[0], 1), START), targets[:, :-1]], axis=1)
    logits = model.apply({"params": params}, src, jnp.asarray(tgt_in, jnp.int32))  # [B, T, V]
    if suppress:
        logits = logits.at[..., list(suppress)].set(-jnp.inf)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return np.asarray(jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], -1)[..., 0])


def greedy_after_prefix(seq2seq, src, prefix, max_length, end=END, suppress=()):
    """The reference: teacher-force ``prefix``, then continue greedily, one full pass per token.

    Returns the ids ``[B, max_length]`` (end id after EOS) and the log-probs of the free tokens
    (EOS included), the prefix excluded.
    """
    model, params = seq2seq
    forward = jax.jit(model.apply)
    batch, p = prefix.shape
    ids = np.full((batch, max_length), end, np.int64)
    ids[:, :p] = prefix
    done = np.zeros(batch, bool)
    score = np.zeros(batch)
    for t in range(p, max_length):
        tgt_in = np.concatenate([np.full((batch, 1), START), ids[:, :-1]], axis=1)
        logits = np.array(forward({"params": params}, src, jnp.asarray(tgt_in, jnp.int32))[:, t])
        logits[:, list(suppress)] = -np.inf
        log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
        token = np.where(done, end, log_probs.argmax(-1))
        score += np.where(done, 0.0, log_probs[np.arange(batch), token])
        ids[:, t] = token
        done |= token == end
    return ids, score


# --- the ids start with the prefix, for every strategy ----------------------------------------


@pytest.mark.parametrize("compat", [None, "opennmt-tf"])
@pytest.mark.parametrize("search", SEARCHES)
def test_every_hypothesis_starts_with_its_prefix(seq2seq, search, compat):
    result = run(seq2seq, target_prefix=PREFIX, compat=compat, **SEARCHES[search])
    ids = np.asarray(result.ids)
    width = ids.shape[1]
    np.testing.assert_array_equal(ids[:, :, :2], np.repeat(PREFIX[:, None], width, axis=1))
    assert (np.asarray(result.lengths) >= 2).all()  # the prefix counts
    assert np.isfinite(np.asarray(result.log_probs)).all()
    # The same call as a list of lists.
    again = run(seq2seq, target_prefix=PREFIX.tolist(), compat=compat, **SEARCHES[search])
    np.testing.assert_array_equal(again.ids, result.ids)


def test_without_prefix_the_first_tokens_differ(seq2seq):
    """The prefix test above can fail: the model's own first tokens are not the prefix."""
    free = np.asarray(run(seq2seq).ids[:, 0, :2])
    assert not (free == PREFIX).all(axis=1).any()


# --- greedy: the teacher-forced reference -----------------------------------------------------


@pytest.mark.parametrize("prefix", [PREFIX[:, :1], PREFIX])
def test_greedy_with_prefix_equals_teacher_forcing_then_greedy(seq2seq, prefix):
    src = source_batch()
    # The end id among the tokens the reference produces, so that rows end at different steps.
    first, _ = greedy_after_prefix(seq2seq, src, prefix, MAX)
    end = int(first[0, prefix.shape[1] + 1])
    want, want_score = greedy_after_prefix(seq2seq, src, prefix, MAX, end)
    got = run(seq2seq, src, end_id=end, target_prefix=prefix)
    assert (want == end).any() and not (want == end).all()
    np.testing.assert_array_equal(got.ids[:, 0], want)
    np.testing.assert_array_equal(got.lengths[:, 0], (want != end).sum(-1))
    # The score convention: the forced tokens add 0; the free tokens (EOS included) their log-prob.
    np.testing.assert_allclose(got.log_probs[:, 0], want_score, atol=1e-4)
    np.testing.assert_allclose(got.scores[:, 0], want_score, atol=1e-4)


def test_beam_of_one_with_prefix_is_greedy_with_prefix(seq2seq):
    greedy = run(seq2seq, target_prefix=PREFIX)
    beam = run(seq2seq, target_prefix=PREFIX, strategy=dec.BeamSearch(1))
    np.testing.assert_array_equal(beam.ids, greedy.ids)
    np.testing.assert_allclose(beam.log_probs, greedy.log_probs, atol=1e-6)


# --- beam search: one live beam through the prefix --------------------------------------------


@pytest.mark.parametrize("length_penalty", [0.0, 0.6])
def test_beam_hypotheses_share_the_prefix_and_are_distinct(seq2seq, length_penalty):
    src, width = source_batch(), 4
    result = run(seq2seq, src, target_prefix=PREFIX, strategy=dec.BeamSearch(width, length_penalty))
    ids, lengths = np.asarray(result.ids), np.asarray(result.lengths)
    for b in range(ids.shape[0]):
        hypotheses = {tuple(ids[b, w, : lengths[b, w] + 1]) for w in range(width)}
        assert len(hypotheses) == width, ids[b]  # no beam copied by the forced steps
    # Every hypothesis's log-prob is the teacher-forced log-prob of its free tokens (EOS included).
    flat = ids.reshape(-1, MAX)
    per_token = teacher_forced_log_probs(seq2seq, np.repeat(src, width, axis=0), flat)
    t = np.arange(MAX)[None]
    free = (t >= 2) & (t <= lengths.reshape(-1, 1))
    np.testing.assert_allclose(
        result.log_probs, (per_token * free).sum(-1).reshape(-1, width), atol=1e-4
    )


def test_beam_with_prefix_equals_beam_on_the_model_conditioned_on_it():
    """A step function that ignores its steps before P: the prefix search is the plain search
    shifted by P, its log-probs unchanged (the forced steps add nothing, multiply no beam)."""
    vocab, p = 7, 2
    table = jax.random.normal(jax.random.key(5), (MAX, vocab)) * 2.0  # logits per step

    def step(ids, t, state):
        return jnp.broadcast_to(table[t], (ids.shape[0], vocab)), state

    def shifted(ids, t, state):
        return step(ids, jnp.minimum(t + p, MAX - 1), state)

    kwargs = dict(strategy=dec.BeamSearch(3), end_id=0)
    start = jnp.array([1, 1], jnp.int32)
    prefix = np.array([[3, 4], [5, 6]], np.int32)
    forced = dec.dynamic_decode(step, start, max_length=MAX, target_prefix=prefix, **kwargs)
    plain = dec.dynamic_decode(shifted, start, max_length=MAX - p, **kwargs)
    np.testing.assert_array_equal(forced.ids[:, :, :p], np.repeat(prefix[:, None], 3, axis=1))
    np.testing.assert_array_equal(forced.ids[:, :, p:], plain.ids)
    np.testing.assert_allclose(forced.log_probs, plain.log_probs, atol=1e-6)


def test_forced_tokens_add_zero_to_the_scores():
    """The model puts almost no mass on the forced token: the score does not see it."""
    vocab = 6
    logits = jnp.array([[0.0, 0, 0, 9, 0, 0]] + [[0.0, 0, 5, 0, 0, 0]] * 3)  # step 0 wants 3

    def step(ids, t, state):
        return jnp.broadcast_to(logits[t], (ids.shape[0], vocab)), state

    for strategy in (dec.GreedySearch(), dec.BeamSearch(2)):
        result = dec.dynamic_decode(
            step, jnp.array([1]), 2, strategy=strategy, max_length=4, target_prefix=[[4]]
        )
        assert result.ids[0, 0].tolist() == [4, 2, 2, 2]
        step_one = float(jax.nn.log_softmax(logits[1])[2])  # the EOS at step 1, nothing else
        np.testing.assert_allclose(result.log_probs[0, 0], step_one, atol=1e-6)
        np.testing.assert_allclose(result.scores[0, 0], step_one, atol=1e-6)


def test_min_length_counts_the_prefix():
    vocab = 6
    logits = jnp.array([[0.0, 0, 9, 0, 0, 0]] * 5)  # EOS at every step, if allowed

    def step(ids, t, state):
        return jnp.broadcast_to(logits[t], (ids.shape[0], vocab)), state

    decode = functools.partial(
        dec.dynamic_decode, step, jnp.array([1]), 2, max_length=5, target_prefix=[[4, 5]]
    )
    assert decode().lengths[0, 0] == 2  # EOS right after the prefix
    assert decode(min_length=2).lengths[0, 0] == 2  # min_length <= P: nothing more
    assert decode(min_length=4).lengths[0, 0] == 4  # two free tokens before EOS


# --- suppressed tokens ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def biased():
    """A model whose output bias makes token 7 (then 9) the best choice nearly everywhere."""
    model, params = make(Transformer, output_bias=True)
    bias = params["output"]["bias"].at[7].add(30.0).at[9].add(15.0)
    return model, {**params, "output": {**params["output"], "bias": bias}}


@pytest.mark.parametrize("search", SEARCHES)
def test_suppressed_tokens_never_appear(biased, search):
    preferred = run(biased, **SEARCHES[search])
    assert (np.asarray(preferred.ids) == 7).any()  # the model does want token 7
    result = run(biased, suppress_ids=(7,), **SEARCHES[search])
    ids = np.asarray(result.ids)
    assert not (ids == 7).any()
    assert (ids == 9).any()  # the next best takes its place
    assert np.isfinite(np.asarray(result.log_probs)).all()


def test_greedy_with_suppressed_tokens_equals_the_masked_reference(biased):
    src = source_batch()
    prefix = PREFIX[:, :1]
    want, want_score = greedy_after_prefix(biased, src, prefix, MAX, suppress=(7, 9))
    got = run(biased, src, target_prefix=prefix, suppress_ids=[9, 7, 7])  # any order, repeats
    np.testing.assert_array_equal(got.ids[:, 0], want)
    # The log-softmax is taken after the suppression (the other tokens' log-probs renormalised).
    np.testing.assert_allclose(got.log_probs[:, 0], want_score, atol=1e-4)


def test_a_forced_token_is_emitted_even_if_suppressed(biased):
    result = run(biased, target_prefix=[[7], [7], [7]], suppress_ids=(7,))
    ids = np.asarray(result.ids[:, 0])
    assert (ids[:, 0] == 7).all() and not (ids[:, 1:] == 7).any()


def test_suppression_works_for_decoder_only_models():
    model, params = make(DecoderOnlyLM, output_bias=True)
    bias = params["output"]["bias"].at[7].add(30.0)
    params = {**params, "output": {**params["output"], "bias": bias}}
    prompt = jnp.array([[4, 5, 6], [8, 9, 10]])
    assert (np.asarray(generate(model, params, prompt, end_id=2, max_length=5).ids) == 7).all()
    result = generate(model, params, prompt, end_id=2, max_length=5, suppress_ids=(7,))
    assert not (np.asarray(result.ids) == 7).any()


def test_nothing_given_changes_nothing(seq2seq):
    for search in SEARCHES.values():
        plain = run(seq2seq, **search)
        empty = run(seq2seq, suppress_ids=(), target_prefix=np.zeros((3, 0), np.int32), **search)
        np.testing.assert_array_equal(empty.ids, plain.ids)
        np.testing.assert_array_equal(empty.log_probs, plain.log_probs)


# --- text level -------------------------------------------------------------------------------


def test_translate_texts_takes_a_prefix_and_suppressed_ids(biased):
    model, params = biased
    tokenizer = CharTokenizer(tuple("abcdefghijklmnopqrstuvwxyz01"))  # 4 specials + 28 = V 32
    assert tokenizer.vocab_size == model.config.vocab_size
    lines = ["hello", "abc", "jax"]
    options = DecodeOptions(max_length=6, target_prefix=[tokenizer.encode("q")[0]])
    assert options.target_prefix == (tokenizer.encode("q")[0],)  # a list becomes a tuple
    outputs = translate_texts(model, params, tokenizer, tokenizer, lines, options, batch_size=2)
    assert all(o.texts[0].startswith("q") for o in outputs)
    seven = tokenizer.decode([7])
    assert any(seven in o.texts[0][1:] for o in outputs)  # the biased model's favourite
    options = DecodeOptions(max_length=6, suppress_ids=(7,), beam_size=2)
    outputs = translate_texts(model, params, tokenizer, tokenizer, lines, options)
    assert not any(seven in o.texts[0] for o in outputs)


# --- one trace per shape ----------------------------------------------------------------------


def test_generate_compiles_once_per_prefix_length(seq2seq):
    from jaxformer.decoding.generation import _run

    before = _run._cache_size()
    for shift in range(3):
        result = run(seq2seq, target_prefix=PREFIX + shift, strategy=dec.BeamSearch(2))
        np.testing.assert_array_equal(result.ids[:, 0, :2], PREFIX + shift)
    assert _run._cache_size() == before + 1
    run(seq2seq, target_prefix=PREFIX[:, :1], strategy=dec.BeamSearch(2))
    assert _run._cache_size() == before + 2  # the check can fail: a new length is a new trace


def test_decode_loop_with_prefix_traces_once_per_shape(seq2seq):
    model, params = seq2seq
    traces = []

    @jax.jit
    @chex.assert_max_traces(n=1)
    def decode(src, prefix):
        traces.append(1)
        memory, valid = model.apply({"params": params}, src, method=Transformer.encode)
        cache = model.apply({"params": params}, src.shape[0], MAX, method=Transformer.init_cache)
        kv = model.apply({"params": params}, memory, valid, method=Transformer.init_memory)
        step_fn = lambda ids, t, c, kv: model.apply(
            {"params": params}, ids, t, c, kv, method=Transformer.decode_step
        )
        return dec.dynamic_decode(
            step_fn, jnp.full([src.shape[0]], START), END, cache, max_length=MAX, shared=kv,
            target_prefix=prefix, suppress_ids=(7,), strategy=dec.BeamSearch(2),
        )  # fmt: skip

    for shift in range(3):
        result = decode(source_batch(seed=shift), jnp.asarray(PREFIX + shift))
        np.testing.assert_array_equal(result.ids[:, 1, :2], PREFIX + shift)
    assert len(traces) == 1
    with pytest.raises(AssertionError):  # a new prefix length is a new trace
        decode(source_batch(), jnp.asarray(PREFIX[:, :1]))


# --- errors -----------------------------------------------------------------------------------

ERRORS = [
    (dict(target_prefix=[[5], [END], [6]]), r"target_prefix must not contain end_id=2"),
    (dict(target_prefix=[[5], [32], [6]]), r"target_prefix ids must be in \[0, 32\).*\[5, 32\]"),
    (dict(target_prefix=[[5], [-1], [6]]), r"target_prefix ids must be in \[0, 32\)"),
    (dict(target_prefix=[[5, 6]] * 3, max_length=2), r"P=2 .*P must be < max_length=2"),
    (dict(target_prefix=[[5, 6]] * 2), r"target_prefix must be int32\[3, P\].*\(2, 2\)"),
    (dict(target_prefix=[5, 6, 7]), r"target_prefix must be int32\[3, P\].*\(3,\)"),
    (dict(target_prefix=[[5], [6, 7], [8]]), r"rows of different lengths"),
    (dict(target_prefix=[[5.0], [6.0], [7.0]]), r"target_prefix must be integer token ids"),
    (dict(suppress_ids=(32,)), r"suppress_ids: \[32\] outside the target vocabulary \[0, 32\)"),
    (dict(suppress_ids=(5, END)), r"suppress_ids must not contain end_id=2"),
    (dict(suppress_ids=(5, True)), r"suppress_ids must be a tuple of token ids in \[0, 32\)"),
]


@pytest.mark.parametrize(("kwargs", "message"), ERRORS)
def test_bad_options_are_refused_by_name(seq2seq, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(seq2seq, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), ERRORS)
def test_dynamic_decode_refuses_the_same(kwargs, message):
    kwargs = dict(max_length=MAX) | kwargs
    step = lambda ids, t, state: (jnp.zeros((ids.shape[0], 32)), state)
    with pytest.raises(ValueError, match=message):
        dec.dynamic_decode(step, jnp.ones([3], jnp.int32), END, **kwargs)


@pytest.mark.parametrize("suppress_ids", [7, ("7",)])
def test_suppress_ids_of_the_wrong_type_are_refused(suppress_ids):
    # jaxtyping refuses these first in the tests (the annotation); without it, this message.
    with pytest.raises(ValueError, match=r"suppress_ids must be a tuple of token ids in \[0, 32\)"):
        opt.check_suppress_ids(suppress_ids, 32, END)


def test_a_decoder_only_model_takes_no_target_prefix():
    model, params = make(DecoderOnlyLM)
    with pytest.raises(ValueError, match=r"target_prefix is for encoder-decoder models"):
        generate(model, params, jnp.array([[4, 5]]), end_id=2, max_length=5, target_prefix=[[6]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_prefix=(5, True)), r"target_prefix\[1\] must be an int >= 0, got True"),
        (dict(suppress_ids=(4, -1)), r"suppress_ids\[1\] must be an int >= 0, got -1"),
        (dict(target_prefix=(4, 5), max_length=2), r"shorter than max_length=2"),
    ],
)
def test_decode_options_refuse_bad_ids(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeOptions(**kwargs)
