"""The serving engine (jaxformer/serving): every request's result is ``generate``'s for it alone.

Also what the engine needs below it: an encoder-decoder step at per-row positions, and the search
options that are data (one compile of ``generate`` for every penalty, temperature, top-p < 1 and
min_length, with the results of the static options).
"""

import asyncio
import concurrent.futures
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import DecoderOnlyLM, Transformer, generate
from jaxformer import decoding as dec
from jaxformer.decoding.decode_options import DecodeOptions
from jaxformer.serving import Engine

from helpers import VARIANTS, make, source_batch

END = 2


@pytest.mark.parametrize(
    "overrides",
    [VARIANTS["post_relative"], dict(positions="learned"),
     dict(relative_attention_num_buckets=8, relative_attention_max_distance=6, positions="none")],
    ids=["shaw", "learned", "t5_buckets"],  # sinusoids: every engine test
)  # fmt: skip
def test_encoder_decoder_steps_at_per_row_positions_equal_the_full_pass(overrides):
    """Row r decodes position ``clip(s - lag[r], 0, 6)`` at step s (rewriting a slot is harmless)."""
    model, params = make(Transformer, **overrides)
    variables = {"params": params}
    src = source_batch()  # [3, 6]
    tgt = jax.random.randint(jax.random.key(3), (3, 7), 3, 32)
    full = model.apply(variables, src, tgt)  # [3, 7, V]
    encoded, valid = model.apply(variables, src, method=Transformer.encode)
    memory = model.apply(variables, encoded, valid, method=Transformer.init_memory)
    lag = jnp.asarray([0, 2, 1])

    @jax.jit
    def steps(cache):
        def one(cache, s):
            at = jnp.clip(s - lag, 0, 6)  # [R]
            ids = tgt[jnp.arange(3), at]
            logits, cache, _ = model.apply(
                variables, ids, at, cache, memory, method=Transformer.decode_step
            )
            return cache, (logits, at)

        return jax.lax.scan(one, cache, jnp.arange(9))[1]

    cache = model.apply(variables, 3, 7, method=Transformer.init_cache)
    logits, at = steps(cache)  # [9, 3, V], [9, 3]
    want = full[jnp.arange(3)[None], at]  # [9, 3, V]
    np.testing.assert_allclose(logits, want, atol=2e-5, rtol=0)


def test_generate_takes_penalties_temperature_top_p_and_min_length_as_data():
    """One compile serves every value, and the numbers are those the static options gave."""
    from jaxformer.decoding.generation import _run

    model, params = make(Transformer)
    src = source_batch()

    def run(strategy, sampler=dec.BestSampler(), **kw):
        rng = jax.random.key(4) if isinstance(sampler, dec.RandomSampler) else None
        return generate(
            model, params, src, start_id=1, end_id=END, max_length=6, strategy=strategy,
            sampler=sampler, rng=rng, **kw,
        )  # fmt: skip

    variables = {"params": params}
    encoded, valid = model.apply(variables, src, method=Transformer.encode)
    memory = model.apply(variables, encoded, valid, method=Transformer.init_memory)
    cache = model.apply(variables, 3, 6, method=Transformer.init_cache)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def static(alpha, minimum):  # the options as Python numbers, inside dynamic_decode
        return dec.dynamic_decode(
            dec.step_function(dec.adapter_for(model), params), jnp.ones([3], jnp.int32), END, cache,
            dec.BeamSearch(3, alpha), max_length=6, min_length=minimum, shared=memory,
        )  # fmt: skip

    run(dec.BeamSearch(3, 0.2), min_length=1)
    before = _run._cache_size()
    for alpha, minimum in ((0.0, 0), (0.6, 2), (1.0, 3)):
        got = run(dec.BeamSearch(3, alpha), min_length=minimum)
        want = static(alpha, minimum)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
        assert (np.asarray(got.lengths) >= minimum).all()
    assert _run._cache_size() == before  # penalties and min_length are data
    run(dec.GreedySearch(), dec.RandomSampler(topk=0, top_p=0.5))
    before = _run._cache_size()
    for temperature, top_p in ((0.7, 0.9), (1.3, 0.3)):
        run(dec.GreedySearch(), dec.RandomSampler(topk=0, temperature=temperature, top_p=top_p))
    assert _run._cache_size() == before
    with pytest.raises(ValueError, match="nucleus"):
        dec.RandomSampler(top_p=0.5, nucleus=False)
    with pytest.raises(ValueError, match="coverage=True"):
        dec.BeamSearch(2, coverage_penalty=0.2, coverage=False)


# The engine. One engine per model kind, shared by the tests below in order (each kind is an
# xdist group: one worker builds and compiles it once, the other kind runs beside it).
KINDS = {
    "encoder_decoder": pytest.param("encoder_decoder", marks=pytest.mark.xdist_group("engine_ed")),
    "lm": pytest.param("lm", marks=pytest.mark.xdist_group("engine_lm")),
}
WIDTH, MAX_LENGTH, MAX_INPUT = 3, 10, 20
LENGTHS = (1, 6, 13, 20)  # input lengths drawn (few: each is a compile of generate alone)


@functools.cache
def kind_model(kind):
    model, params = make(Transformer if kind == "encoder_decoder" else DecoderOnlyLM)
    # Sharper distributions (a trained model's are): no choice is left to rounding noise.
    params = {**params, "output": jax.tree.map(lambda w: 3 * w, params["output"])}
    return model, params


@functools.cache
def kind_engine(kind):
    model, params = kind_model(kind)
    return Engine(
        model, params, start_id=1, end_id=END, groups={1: 3, WIDTH: 2}, max_length=MAX_LENGTH,
        max_input_length=MAX_INPUT, sampling_topk=0, coverage=kind == "encoder_decoder",
        chunk_size=3 if kind == "lm" else 4, bucket=8, start=False,
    )  # fmt: skip


@functools.cache
def alone(kind, inputs: tuple, options: DecodeOptions):
    """``generate`` for one request alone (a batch of one, the same options)."""
    model, params = kind_model(kind)
    start = dict(start_id=1) if kind == "encoder_decoder" else {}
    o = options
    return generate(
        model, params, [list(inputs)], end_id=END, max_length=o.max_length,
        min_length=o.min_length, strategy=o.strategy, sampler=o.sampler, rng=o.rng, **start,
    )  # fmt: skip


def assert_as_alone(kind, inputs, options, got):
    want = alone(kind, tuple(inputs), options)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-5, rtol=0)
    assert int(got.steps) == int(want.steps)


def random_request(rng: np.random.Generator, kind: str):
    """Inputs and options drawn as the property test draws them."""
    size = int(rng.choice(LENGTHS))
    inputs = tuple(int(i) for i in rng.integers(3, 32, size))
    beam = int(rng.choice([1, WIDTH]))
    max_length = int(rng.choice([4, MAX_LENGTH]))
    kw = dict(beam_size=beam, max_length=max_length, min_length=int(rng.integers(0, 3)))
    if beam > 1:
        kw.update(length_penalty=float(rng.choice([0.0, 0.6])), n_best=int(rng.integers(1, 4)))
        if kind == "encoder_decoder":
            kw.update(coverage_penalty=float(rng.choice([0.0, 0.4])))
    elif rng.random() < 0.5:  # seeded sampling, with or without a nucleus
        kw.update(
            sampling_topk=0, seed=int(rng.integers(100)),
            sampling_temperature=float(rng.choice([0.7, 1.0])), top_p=float(rng.choice([1, 0.8])),
        )  # fmt: skip
    return inputs, DecodeOptions(**kw)


@pytest.mark.parametrize("kind", KINDS.values())
def test_every_request_gets_generates_result_for_it_alone(kind):
    """Requests arrive between random chunks with random options and input lengths; whatever runs
    beside them, each result is ``generate``'s for the request alone, and greedy and sampling
    requests stream exactly their tokens."""
    engine, rng = kind_engine(kind), np.random.default_rng(0 if kind == "lm" else 1)
    requests = [random_request(rng, kind) for _ in range(12)]
    arrivals = np.sort(rng.integers(0, 10, len(requests)))
    handles, streamed, unfinished = [], [], []
    for turn in range(100):
        for i in np.flatnonzero(arrivals == turn):
            streamed.append([])
            handles.append(engine.submit(*requests[i], on_tokens=streamed[-1].extend))
        unfinished.append(sum(not h.done() for h in handles))
        if not engine.step() and len(handles) == len(requests):
            break
    assert max(unfinished) > 2 + 3  # more requests than groups: some waited for a free one
    for (inputs, options), handle, tokens in zip(requests, handles, streamed, strict=True):
        got = handle.result(timeout=0.0)
        assert_as_alone(kind, inputs, options, got)
        if options.beam_size == 1:
            assert tokens == got.ids[0, 0, : got.lengths[0, 0]].tolist()
        else:
            assert tokens == []  # beam search: the result at the end


@pytest.mark.parametrize("kind", KINDS.values())
def test_the_chunk_compiles_once_and_the_prefill_once_per_bucket_and_size(kind):
    engine = kind_engine(kind)
    if not engine.traces["chunk"]:
        test_every_request_gets_generates_result_for_it_alone(kind)
    buckets = len({min(MAX_INPUT, -(-max(n, 1) // 8) * 8) for n in LENGTHS})
    assert engine.traces["chunk"] == 1
    for width, groups in ((1, 3), (WIDTH, 2)):
        sizes = groups.bit_length() + (groups & (groups - 1) != 0)  # 1, 2, 4 ... >= groups
        assert 1 <= engine.traces[f"admit[{width}]"] <= buckets * sizes
        assert engine.traces[f"finalize[{width}]"] == 1


@pytest.mark.parametrize("kind", [KINDS["lm"]])
def test_cancelling_frees_the_slots_for_the_next_request(kind):
    engine = kind_engine(kind)
    prompt = tuple(range(3, 9))  # 6 tokens: a bucket the engine has compiled
    long = DecodeOptions(max_length=MAX_LENGTH, min_length=MAX_LENGTH)  # runs all its steps
    first = [engine.submit(prompt, long) for _ in range(3)]  # every greedy group taken
    waiting = engine.submit(prompt, DecodeOptions(max_length=4))
    never = engine.submit(prompt, DecodeOptions(max_length=4))
    engine.step()
    assert not any(h.done() for h in [*first, waiting, never])
    assert never.cancel() and first[0].cancel()
    engine.step()  # the cancelled request left before this chunk; ``waiting`` took its group
    while engine.step():
        pass
    for handle in (first[0], never):
        with pytest.raises(concurrent.futures.CancelledError):
            handle.result(timeout=0.0)
    # Their streams have ended: the cancelled request had streamed one chunk (3 steps).
    assert list(first[0].tokens(timeout=0.0)) == [alone(kind, prompt, long).ids[0, 0, :3].tolist()]
    assert list(never.tokens(timeout=0.0)) == []
    for handle in (*first[1:], waiting):
        assert_as_alone(kind, prompt, handle.options, handle.result(timeout=0.0))
    assert waiting.cancel() is False  # finished: nothing left to cancel


@pytest.mark.parametrize("kind", [KINDS["lm"]])
def test_requests_the_engine_cannot_serve_are_refused_at_once(kind):
    engine = kind_engine(kind)
    refused = {
        "beam_size=2": DecodeOptions(max_length=4, beam_size=2),
        "exceeds the engine's": DecodeOptions(max_length=MAX_LENGTH + 1),
        "sampling_topk=5": DecodeOptions(max_length=4, sampling_topk=5),
        "suppress_ids": DecodeOptions(max_length=4, suppress_ids=[5]),
        "stop": DecodeOptions(max_length=4, stop=["a"]),
    }
    for message, options in refused.items():
        with pytest.raises(ValueError, match=message):
            engine.submit([3, 4], options)
    with pytest.raises(ValueError, match="max_input_length"):
        engine.submit(list(range(3, 3 + MAX_INPUT + 1)), DecodeOptions(max_length=4))
    with pytest.raises(ValueError, match="prompt ids must be in"):
        engine.submit([3, 99], DecodeOptions(max_length=4))


@pytest.mark.parametrize("kind", [KINDS["encoder_decoder"]])
def test_threads_and_an_event_loop_submit_to_the_running_engine(kind):
    engine = kind_engine(kind)
    engine.start()
    rng = np.random.default_rng(5)
    requests = [random_request(rng, kind) for _ in range(6)]
    results = [None] * len(requests)

    def submit(i):
        results[i] = engine.submit(*requests[i]).result(timeout=120.0)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (inputs, options), got in zip(requests, results, strict=True):
        assert_as_alone(kind, inputs, options, got)

    greedy = (requests[0][0], DecodeOptions(max_length=MAX_LENGTH))

    async def serve():
        streamed = engine.submit(*greedy)
        tokens = [t async for chunk in streamed.atokens() for t in chunk]
        beam = engine.submit(*requests[1])
        return tokens, await streamed.aresult(), await beam.aresult()

    tokens, got, beam = asyncio.run(serve())
    assert_as_alone(kind, *greedy, got)
    assert tokens == got.ids[0, 0, : got.lengths[0, 0]].tolist()
    assert_as_alone(kind, *requests[1], beam)

    # More greedy requests at once than greedy groups: each finished group takes a waiting one.
    many = [engine.submit(*greedy) for _ in range(8)]
    for handle in many:
        assert_as_alone(kind, *greedy, handle.result(timeout=120.0))

    pending = [engine.submit(*greedy) for _ in range(8)]
    engine.close()  # cancels what has not finished, and stops the thread
    assert not engine._thread.is_alive()
    assert all(h.done() for h in pending) and any(h.future.cancelled() for h in pending)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([3], DecodeOptions(max_length=4))


@pytest.mark.xdist_group("engine_ed")
def test_a_forced_target_prefix_and_suppressed_tokens_as_generate_gives_them():
    """NLLB's target language (a prefix of one token, each request's own) and Marian's suppressed
    padding (every request's): each result is ``generate``'s for the request alone."""
    model, params = kind_model("encoder_decoder")
    engine = Engine(
        model, params, start_id=1, end_id=END, groups={1: 2, WIDTH: 1}, max_length=MAX_LENGTH,
        max_input_length=MAX_INPUT, chunk_size=4, bucket=8, start=False, suppress_ids=(4, 7),
        prefix_length=1,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    requests = []
    for k in range(5):
        inputs = [int(i) for i in rng.integers(3, 32, int(rng.choice(LENGTHS)))]
        beam = dict(beam_size=WIDTH, n_best=2, length_penalty=0.6) if k % 2 else {}
        options = DecodeOptions(
            max_length=MAX_LENGTH, target_prefix=(int(rng.integers(10, 30)),), suppress_ids=(7, 4),
            **beam,
        )  # fmt: skip
        requests.append((inputs, options))
    handles = [engine.submit(*request) for request in requests]
    while engine.step():
        pass
    for (inputs, o), handle in zip(requests, handles, strict=True):
        want = generate(
            model, params, [inputs], start_id=1, end_id=END, max_length=o.max_length,
            strategy=o.strategy, target_prefix=[list(o.target_prefix)], suppress_ids=o.suppress_ids,
        )  # fmt: skip
        got = handle.result(timeout=0.0)
        assert got.ids[0, 0, 0] == o.target_prefix[0]
        np.testing.assert_array_equal(got.ids, want.ids[:, : o.n_best])
        np.testing.assert_array_equal(got.lengths, want.lengths[:, : o.n_best])
        np.testing.assert_allclose(got.scores, want.scores[:, : o.n_best], atol=1e-5, rtol=0)
    for wrong in (dict(target_prefix=()), dict(target_prefix=(5, 6)), dict(suppress_ids=(4,))):
        options = {"target_prefix": (5,), "suppress_ids": (4, 7), **wrong}
        with pytest.raises(ValueError, match=r"prefix_length=1|suppresses"):
            engine.submit([3, 4], DecodeOptions(max_length=4, **options))
