"""Greedy decoding: hand-checked answers, a naive prefix-recomputing loop, one trace per shape."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding as dec
from jaxformer import generate

from helpers import DecoderOnlyLM, Transformer, make, source_batch


def one_hot_step_fn(targets, vocab=10):
    """OpenNMT-tf's greedy test model: at step t, row b puts all its mass on targets[b][t]."""
    logits = jax.nn.one_hot(jnp.asarray(targets).T, vocab) * 10.0  # [T, B, V]
    return lambda ids, step, state: (logits[jnp.minimum(step, logits.shape[0] - 1)], state)


def greedy(targets, **kwargs):
    state = {"unused": jnp.zeros([len(targets)])}
    return dec.dynamic_decode(
        one_hot_step_fn(targets), jnp.ones([len(targets)], jnp.int32), 2, state, **kwargs
    )


def test_opennmt_tf_greedy_examples():
    result = greedy([[4, 5, 6, 2], [3, 8, 2, 8]], max_length=4)
    np.testing.assert_array_equal(result.ids, [[[4, 5, 6, 2]], [[3, 8, 2, 2]]])
    np.testing.assert_array_equal(result.lengths, [[3], [2]])
    result = greedy([[4, 5, 6, 2], [3, 8, 2, 8]], max_length=2)
    np.testing.assert_array_equal(result.ids, [[[4, 5]], [[3, 8]]])
    np.testing.assert_array_equal(result.lengths, [[2], [2]])
    result = greedy([[4, 2, 2, 2], [3, 8, 7, 2]], max_length=4, min_length=2)
    np.testing.assert_array_equal(result.lengths, [[2], [3]])


def test_finished_rows_keep_emitting_eos_and_their_score():
    result = greedy([[2, 5, 6, 7], [3, 4, 5, 6]], max_length=4)
    np.testing.assert_array_equal(result.ids[0, 0], [2, 2, 2, 2])
    assert result.lengths[0, 0] == 0
    # One step at probability ~1 (logit 10 against 9 zeros), then nothing more is added.
    expected = -np.log1p(9 * np.exp(-10.0))
    np.testing.assert_allclose(result.log_probs[0, 0], expected, atol=1e-6)  # float32 round-off
    np.testing.assert_allclose(result.log_probs[1, 0], 4 * expected, atol=1e-6)


def naive_greedy(model, params, src, start_id, end_id, max_length):
    """The Annotated Transformer's greedy_decode: rerun the whole decoder on the prefix at every step.

    The prefix lives in a buffer of fixed width (start token, the tokens so far, then padding) and
    step t reads the logits at position t: the causal mask (tested on its own in
    test_model_properties) keeps the padding after t out of them, and one compiled full pass
    serves every step (growing the prefix by one each step compiled twelve programs, most of the
    test's time).
    """
    memory, valid = model.apply({"params": params}, src, method=Transformer.encode)
    decode = jax.jit(functools.partial(model.apply, method=Transformer.decode))
    ys = np.zeros((src.shape[0], max_length), np.int32)
    ys[:, 0] = start_id
    done = np.zeros(src.shape[0], bool)
    out = []
    for t in range(max_length):
        logits, _ = decode({"params": params}, jnp.asarray(ys), memory, valid)
        token = np.asarray(jnp.argmax(logits[:, t], axis=-1))
        token = np.where(done, end_id, token)
        done |= token == end_id
        out.append(token)
        if t + 1 < max_length:
            ys[:, t + 1] = token
    return np.stack(out, axis=1)


@pytest.mark.parametrize("overrides", [dict(), dict(maximum_relative_position=4, pre_norm=False)])
def test_scan_greedy_equals_naive_prefix_recomputation(overrides):
    model, params = make(Transformer, **overrides)
    src = source_batch()
    # Pick the end id among tokens the model actually produces, so that rows end at different steps.
    first = naive_greedy(model, params, src, 1, 0, 12)
    end_id = int(first[0, 3])
    want = naive_greedy(model, params, src, 1, end_id, 12)
    got = generate(model, params, src, start_id=1, end_id=end_id, max_length=12)
    np.testing.assert_array_equal(got.ids[:, 0], want)
    assert (want == end_id).any()


def test_decode_loop_traces_once_per_shape():
    model, params = make(Transformer)
    traces = []

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, src):
        traces.append(1)
        memory, valid = model.apply({"params": params}, src, method=Transformer.encode)
        cache = model.apply({"params": params}, src.shape[0], 6, method=Transformer.init_cache)
        kv = model.apply({"params": params}, memory, valid, method=Transformer.init_memory)
        step_fn = lambda ids, t, c, kv: model.apply(
            {"params": params}, ids, t, c, kv, method=Transformer.decode_step
        )
        return dec.dynamic_decode(
            step_fn, jnp.ones([src.shape[0]], jnp.int32), 2, cache, max_length=6, shared=kv
        )

    for seed in range(3):
        jax.block_until_ready(run(params, source_batch(seed=seed)))
    assert len(traces) == 1
    with pytest.raises(AssertionError):  # the check can fail: a new shape is a new trace
        run(params, source_batch(length=7))


def test_generate_compiles_once_per_shape():
    from jaxformer.decoding.generation import _run

    model, params = make(Transformer)
    before = _run._cache_size()
    for seed in range(3):
        generate(model, params, source_batch(seed=seed), start_id=1, end_id=2, max_length=5)
    assert _run._cache_size() == before + 1


@pytest.mark.parametrize("strategy", [dec.GreedySearch(), dec.BeamSearch(2)])
def test_generate_chunk_size_is_a_compile_option_with_the_same_results(strategy):
    from jaxformer.decoding.generation import _run

    model, params = make(Transformer)
    run = lambda **kw: generate(
        model, params, source_batch(), start_id=1, end_id=2, max_length=9, strategy=strategy, **kw
    )
    want = run()
    for chunk_size in (None, 1, 4):
        before = _run._cache_size()
        got = run(chunk_size=chunk_size)
        assert _run._cache_size() == before + 1  # a loop of its own
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        for field in ("scores", "log_probs"):  # another program: XLA may round the sums otherwise
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        run(chunk_size=0)


def test_greedy_log_probs_equal_teacher_forced_likelihood():
    model, params = make(Transformer)
    src = source_batch()
    result = generate(model, params, src, start_id=1, end_id=3, max_length=8, min_length=2)
    ids = result.ids[:, 0]
    tgt_in = jnp.concatenate([jnp.ones((3, 1), jnp.int32), ids[:, :-1]], axis=1)
    logits = model.apply({"params": params}, src, tgt_in)
    logits = logits.at[:, :2, 3].add(-1e7)  # the min_length EOS penalty is part of the search
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], axis=-1)[..., 0]
    keep = jnp.arange(8)[None] <= result.lengths  # tokens and the EOS
    np.testing.assert_allclose(result.log_probs[:, 0], jnp.sum(log_probs * keep, axis=1), atol=1e-4)


def lm_greedy_by_recomputation(model, params, prompt, steps):
    """Greedy continuation of a language model, rerunning the whole sequence for every token."""
    ids = np.asarray(prompt)
    forward = jax.jit(model.apply)  # one compilation per length instead of one per operation
    for _ in range(steps):
        logits = forward({"params": params}, jnp.asarray(ids))
        ids = np.concatenate([ids, np.asarray(jnp.argmax(logits[:, -1], -1))[:, None]], axis=1)
    return ids[:, prompt.shape[1] :]


def test_decoder_only_generate_continues_a_prompt_like_the_full_pass():
    model, params = make(DecoderOnlyLM)
    prompt = jax.random.randint(jax.random.key(9), (2, 5), 3, 32)
    result = generate(model, params, prompt, end_id=0, max_length=6)
    continuation = lm_greedy_by_recomputation(model, params, prompt, 6)
    np.testing.assert_array_equal(result.ids[:, 0], continuation)


def test_attention_history_comes_from_the_cross_attention():
    model, params = make(Transformer)
    src = source_batch()
    result = generate(model, params, src, start_id=1, end_id=2, max_length=5, return_attention=True)
    chex.assert_shape(result.attention, (3, 1, 5, 6))
    tgt_in = jnp.concatenate([jnp.ones((3, 1), jnp.int32), result.ids[:, 0, :-1]], axis=1)
    memory, valid = model.apply({"params": params}, src, method=Transformer.encode)
    _, attention = model.apply({"params": params}, tgt_in, memory, valid, method=Transformer.decode)
    keep = (jnp.arange(5)[None] <= result.lengths)[..., None]  # [B, T, 1]
    np.testing.assert_allclose(result.attention[:, 0], attention * keep, atol=1e-6)


def test_hourglass_generate_continues_a_prompt_like_the_full_pass():
    from jaxformer import HourglassLM, hourglass_preset, init_params

    model = HourglassLM(hourglass_preset("tiny", hierarchy="1@1 1@2 1@1"))
    params = init_params(model, jax.random.key(0))
    params = jax.tree.map(lambda x: 3.0 * x if x.ndim == 2 else x, params)  # varied outputs
    prompt = jax.random.randint(jax.random.key(10), (2, 5), 3, model.config.vocab_size)
    result = generate(model, params, prompt, end_id=0, max_length=6)
    continuation = lm_greedy_by_recomputation(model, params, prompt, 6)
    np.testing.assert_array_equal(result.ids[:, 0], continuation)
    assert len(np.unique(continuation)) > 1
