"""Hourglass LM: causality and cached decoding for every shortening x upsampling pair, prefill, ragged
prompts, beam search through the origin tables, config."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding as dec
from jaxformer import generate
from jaxformer.decoding.adapters import adapter_for, step_function
from jaxformer.decoding.state import reorder, tile_batch
from jaxformer.models.cache import BeamKVCache, KVCache
from jaxformer.models.hourglass import (
    HOURGLASS_PRESETS,
    HourglassConfig,
    HourglassLM,
    Level,
    hourglass_preset,
    parse_hierarchy,
)

from helpers import with_embedding_offset

# One shortening by 3, and two nested shortenings by 2 (factors 2 and 4 relative to tokens).
HIERARCHIES = {"single": "1@1 1@3 1@1", "nested": "1@1 1@2 1@4 1@2 1@1"}
PAIRS = list(
    itertools.product(["average", "linear", "attention"], ["repeat", "linear", "attention"])
)
CASES = [
    pytest.param(h, s, u, id=f"{name}-{s}-{u}") for name, h in HIERARCHIES.items() for s, u in PAIRS
]
LENGTH = 10  # a multiple of neither 3 nor 4
CHANGED = (1, 3, LENGTH - 1)  # the positions whose token the causality test changes
VOCAB, D = 32, 32


def compile_fast(fn, *args):
    """jit with XLA's backend optimisations off: these tiny graphs compile ~2x faster, same maths."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def random_params(model, seed=0):
    """Parameters of the right shapes without compiling ``init`` (random layer-norm scales too)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    values = [jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), leaf.dtype) for leaf in leaves]
    return jax.tree.unflatten(treedef, values)


def token_ids(seed, batch=1, length=LENGTH, vocab=VOCAB):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


class Variant:
    """One model, its parameters, and one compiled probe shared by the causality and cache tests.

    The probe runs the full pass on 1 + len(CHANGED) rows (a sequence, then copies with one token
    changed) and returns their logits and the Jacobian of row 0's per-position logit sums with
    respect to its input embeddings (rows of a batch are independent).
    """

    def __init__(self, hierarchy, shortening, upsampling, **overrides):
        relative = dict(maximum_relative_position=2)  # relative attention at every level too
        self.config = HourglassConfig(
            hierarchy=hierarchy,
            shortening=shortening,
            upsampling=upsampling,
            **(relative | overrides),
        )
        self.model = HourglassLM(self.config)
        self.params = random_params(self.model)
        base = token_ids(1)
        self.ids = jnp.concatenate(
            [base, *[base.at[:, p].set((base[:, p] + 1) % VOCAB) for p in CHANGED]]
        )  # [R, T]
        delta = jnp.zeros((*self.ids.shape, D))
        self.logits, self.jacobian = compile_fast(self._probe, delta)(delta)

    def _probe(self, delta):
        def per_position(d):
            logits = with_embedding_offset(
                lambda: self.model.apply({"params": self.params}, self.ids), d, "embedding"
            )  # [R, T, V]
            return logits.sum(axis=-1), logits

        _, vjp, logits = jax.vjp(per_position, delta, has_aux=True)
        cotangents = (
            jnp.eye(LENGTH)[:, None, :] * (jnp.arange(self.ids.shape[0]) == 0)[None, :, None]
        )
        (jacobian,) = jax.vmap(vjp)(cotangents)  # [T out, R, T in, D]
        return logits, jacobian[:, 0]  # [T out, T in, D]

    def decode(self, ids, max_length):
        """Every position through ``decode_step`` in one compiled scan: logits [B, T, V], last cache."""
        model, params = self.model, self.params

        def body(cache, inputs):
            token, t = inputs
            logits, cache, none = model.apply(
                {"params": params}, token, t, cache, method=HourglassLM.decode_step
            )
            assert none is None
            return cache, logits

        def run(ids):
            cache = model.apply(
                {"params": params}, ids.shape[0], max_length, method=HourglassLM.init_cache
            )
            cache, logits = jax.lax.scan(body, cache, (ids.T, jnp.arange(ids.shape[1])))
            return jnp.swapaxes(logits, 0, 1), cache

        return compile_fast(run, ids)(ids)


@functools.cache
def variant(hierarchy, shortening, upsampling, **overrides) -> Variant:
    return Variant(hierarchy, shortening, upsampling, **overrides)


@pytest.mark.parametrize("hierarchy, shortening, upsampling", CASES)
def test_causal_by_gradients_and_by_changing_a_future_token(hierarchy, shortening, upsampling):
    v = variant(hierarchy, shortening, upsampling)
    grad = np.abs(np.asarray(v.jacobian)).sum(-1)  # [T out, T in]
    future = np.triu(np.ones((LENGTH, LENGTH), bool), k=1)
    assert np.all(grad[future] == 0.0), "an output depends on a later input"
    assert grad[~future].min() > 0, "an output ignores one of its inputs"
    logits = np.asarray(v.logits)
    for row, p in enumerate(CHANGED, start=1):
        np.testing.assert_array_equal(logits[row, :p], logits[0, :p])
        assert not np.allclose(logits[row, p], logits[0, p])


@pytest.mark.parametrize("hierarchy, shortening, upsampling", CASES)
def test_cached_decoding_equals_the_full_pass(hierarchy, shortening, upsampling):
    v = variant(hierarchy, shortening, upsampling)
    max_length = LENGTH + 3  # the caches are longer than the sequence, a multiple of no factor
    stepped, cache = v.decode(v.ids[:2], max_length)
    np.testing.assert_allclose(stepped, v.logits[:2], atol=1e-5, rtol=0)
    # Every leaf has the batch axis first (beam search tiles and reorders them all along axis 0).
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(cache))
    # The level with absolute factor f ran exactly at the token steps t % f == 0: slots
    # 0..ceil(T/f)-1 of its caches are written, the others are still zero. (Below the top level the
    # caches end with a scratch slot, written by the steps whose inner step is dropped.)
    level, factor = cache, 1
    for spec in parse_hierarchy(hierarchy):
        written = np.abs(np.asarray(level.pre[0].k)).sum(axis=(0, 1, 3)) > 0  # [S (+1)]
        assert written.shape == (level.length + (factor > 1),)
        assert factor == 1 or written[-1], "the scratch slot was not used"
        written = written[: level.length]
        runs = -(-LENGTH // factor)
        assert written[:runs].all() and not written[runs:].any(), f"factor {factor}"
        level, factor = level.inner, factor * max(spec.shorten, 1)


def test_prefix_outputs_do_not_depend_on_the_sequence_length():
    """No padding, no mask: a shorter sequence (7, a multiple of no factor) gives the same prefix."""
    v = variant(HIERARCHIES["nested"], "attention", "attention")
    apply = lambda ids: v.model.apply({"params": v.params}, ids)
    short = compile_fast(apply, v.ids[:, :7])(v.ids[:, :7])
    np.testing.assert_allclose(short, v.logits[:, :7], atol=1e-5, rtol=0)


def test_an_eager_decode_step_equals_the_full_pass_with_sinusoids_only():
    v = variant(HIERARCHIES["single"], "linear", "linear", maximum_relative_position=0)
    cache = v.model.apply({"params": v.params}, 2, 5, method=HourglassLM.init_cache)
    for t in range(4):  # no jit: the step is also valid op by op (t = 3 runs the inner level)
        logits, cache, _ = v.model.apply(
            {"params": v.params}, v.ids[:2, t], t, cache, method=HourglassLM.decode_step
        )
        np.testing.assert_allclose(logits, v.logits[:2, t], atol=1e-5, rtol=0)


@functools.cache
def search_model():
    """A small-vocabulary model and a compiled full pass over ``[R, MAX_STEPS + 1]`` rows."""
    model = HourglassLM(
        HourglassConfig(hierarchy=HIERARCHIES["nested"], shortening="linear", upsampling="attention",
                        vocab_size=12, maximum_relative_position=2)
    )  # fmt: skip
    params = random_params(model, seed=1)
    rows = jnp.zeros((6, MAX_STEPS + 1), jnp.int32)
    full = compile_fast(lambda ids: model.apply({"params": params}, ids), rows)
    return model, params, full


MAX_STEPS = 8


def test_cached_greedy_equals_greedy_recomputing_the_full_pass():
    model, params, full = search_model()
    start = np.asarray([1, 5, 7, 2, 0, 11])
    rows = np.zeros((6, MAX_STEPS + 1), np.int32)  # causal: the zeros after the prefix are unseen
    rows[:, 0] = start
    for n in range(MAX_STEPS):  # the naive loop: the whole prefix through the full pass each step
        rows[:, n + 1] = np.argmax(np.asarray(full(jnp.asarray(rows)))[:, n], axis=-1)
    want = rows[:, 1:]
    end_id = int(want[0, 4])  # a token the model emits, so that a row ends before max_length
    cache = model.apply({"params": params}, 6, MAX_STEPS, method=HourglassLM.init_cache)
    step = step_function(adapter_for(model), params)  # state: (cache, offset 0: no prompt)
    got = dec.dynamic_decode(step, start, end_id, (cache, jnp.int32(0)), max_length=MAX_STEPS)
    for row, ids in zip(want, np.asarray(got.ids[:, 0]), strict=True):
        stop = np.flatnonzero(row == end_id)
        n = stop[0] if stop.size else MAX_STEPS
        np.testing.assert_array_equal(ids[:n], row[:n])
        assert (ids[n:] == end_id).all()
    assert got.lengths[0, 0] <= 4


def test_beam_search_runs_on_the_cache_and_its_scores_match_the_full_pass():
    model, params, full = search_model()
    start, width = np.asarray([1, 5]), 3
    cache = model.apply({"params": params}, 2, MAX_STEPS, method=HourglassLM.init_cache)
    result = dec.dynamic_decode(
        step_function(adapter_for(model), params),
        start,
        3,
        (cache, jnp.int32(0)),  # the LM adapter's state: the cache and the offset (no prompt)
        strategy=dec.BeamSearch(width),
        max_length=MAX_STEPS,
    )
    assert result.ids.shape == (2, width, MAX_STEPS)
    scores = np.asarray(result.scores)
    assert (np.diff(scores, axis=1) <= 0).all(), "hypotheses are not best first"
    # Each hypothesis' cumulative log-probability, recomputed by teacher forcing the full pass.
    hypotheses = np.asarray(result.ids).reshape(-1, MAX_STEPS)  # [B*W, L]
    rows = np.concatenate([np.repeat(start, width)[:, None], hypotheses], axis=1)
    log_probs = np.asarray(jax.nn.log_softmax(full(jnp.asarray(rows)), axis=-1))  # [B*W, L+1, V]
    lengths = np.asarray(result.lengths).reshape(-1)
    for r in range(rows.shape[0]):
        n = min(lengths[r] + 1, MAX_STEPS)  # the tokens and, if the hypothesis ended, its EOS
        want = log_probs[r, np.arange(n), hypotheses[r, :n]].sum()
        np.testing.assert_allclose(np.asarray(result.log_probs).reshape(-1)[r], want, atol=1e-4)
    assert len({tuple(h) for h in hypotheses[:width]}) == width  # distinct hypotheses


def test_parse_hierarchy():
    assert parse_hierarchy("2@1 4@3 2@1") == (Level(1, 2, 2, 3), Level(3, 4, 0, 0))
    assert parse_hierarchy(" 1@1  2@2 4@4 2@2 0@1 ") == (
        Level(1, 1, 0, 2),
        Level(2, 2, 2, 2),
        Level(4, 4, 0, 0),
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hierarchy=""), "odd number"),
        (dict(hierarchy="2@1 2@2"), "odd number"),
        (dict(hierarchy="2@1"), "odd number"),
        (dict(hierarchy="2@1 x@2 2@1"), "'<layers>@<factor>'"),
        (dict(hierarchy="2@1 2*2 2@1"), "'<layers>@<factor>'"),
        (dict(hierarchy="2@1 -1@2 2@1"), "counts must be >= 0"),
        (dict(hierarchy="2@1 2@2 2@4"), "palindrome"),
        (dict(hierarchy="2@2 2@4 2@2"), "outermost factor must be 1"),
        (dict(hierarchy="1@1 1@2 1@3 1@2 1@1"), "divisible by 2"),
        (dict(hierarchy="1@1 1@2 1@2 1@2 1@1"), "larger than"),
        (dict(hierarchy="1@1 1@0 1@1"), "larger than"),
        (dict(shortening="max"), "shortening must be one of"),
        (dict(upsampling="nearest"), "upsampling must be one of"),
        (dict(d_model=30, num_heads=4), "HourglassConfig: num_heads"),
        (dict(dropout=1.0), "HourglassConfig: dropout"),
        (dict(d_model=33, num_heads=3, sinusoidal=True), "even d_model"),
    ],
)
def test_configs_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        HourglassConfig(**overrides)


def test_tiny_preset_shapes_and_parameters_at_no_cost():
    config = hourglass_preset("tiny")
    assert config is HOURGLASS_PRESETS["tiny"] or config == HOURGLASS_PRESETS["tiny"]
    assert [lv.factor for lv in config.levels] == [1, 2]
    model = HourglassLM(hourglass_preset("tiny", upsampling="attention"))
    ids = jax.ShapeDtypeStruct((2, 9), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    hourglass = shapes["hourglass"]
    assert sorted(hourglass) == ["inner", "post_0", "pre_0", "upsampling"]  # averaging: no params
    assert sorted(hourglass["inner"]) == ["pre_0", "pre_1"]
    out = jax.eval_shape(lambda p, i: model.apply({"params": p}, i), shapes, ids)
    assert out.shape == (2, 9, 32) and out.dtype == jnp.float32
    cache = jax.eval_shape(
        lambda p: model.apply({"params": p}, 2, 9, method=HourglassLM.init_cache), shapes
    )
    # KV caches are heads-major: [B, N, S, H]
    # (below the top level: ceil(9 / 2) = 5 positions and the scratch slot)
    assert cache.pre[0].k.shape == (2, 4, 9, 8) and cache.inner.pre[1].k.shape == (2, 4, 6, 8)
    assert isinstance(cache.upsampling, KVCache) and cache.upsampling.k.shape == (2, 4, 6, 8)
    assert cache.length == 9 and cache.inner.length == 5
    # The stream: h_i as keys, y_{i // K} as values, one head of width D, one slot per position.
    assert cache.stream.k.shape == (2, 1, 9, 32) and cache.stream.v.shape == (2, 1, 9, 32)
    assert cache.inner.stream is None and cache.inner.upsampling is None
    with pytest.raises(ValueError, match="unknown hourglass preset"):
        hourglass_preset("huge")
    with pytest.raises(ValueError, match="max_len"):
        model.apply({"params": shapes}, 1, 129, method=HourglassLM.init_cache)


# --- Prefill -----------------------------------------------------------------------------------------

PREFILL_CASES = [  # both hierarchies, every shortening and every upsampling at least once
    pytest.param(HIERARCHIES["nested"], "attention", "attention", id="nested-attention-attention"),
    pytest.param(HIERARCHIES["nested"], "average", "linear", id="nested-average-linear"),
    pytest.param(HIERARCHIES["single"], "linear", "repeat", id="single-linear-repeat"),
]


def position_slots(level, name="top"):
    """``(name, keys or values)`` of every cache, cut to its position slots (no scratch slot)."""
    out = []
    for field, n in [("pre", level.length), ("post", level.length), ("stream", level.length)] + (
        [("upsampling", level.inner.length)] if level.inner is not None else []
    ):
        value = getattr(level, field)
        for i, kv in enumerate(
            value if isinstance(value, tuple) else [value] * (value is not None)
        ):
            out += [(f"{name}.{field}[{i}].{x}", getattr(kv, x)[:, :, :n]) for x in ("k", "v")]
    if level.inner is not None:
        out += position_slots(level.inner, name + ".inner")
    return out


@pytest.mark.parametrize("hierarchy, shortening, upsampling", PREFILL_CASES)
def test_prefill_equals_feeding_the_prompt_step_by_step(hierarchy, shortening, upsampling):
    """One full pass per level leaves every cache leaf as LENGTH decode steps do, and the next step
    (row 0 at position LENGTH, row 1 back at position 7: per-row positions) reads them alike."""
    v = variant(hierarchy, shortening, upsampling)
    model, variables, max_length = v.model, {"params": v.params}, LENGTH + 3
    _, stepped = v.decode(v.ids[:2], max_length)

    def prefill_then_step(ids, token, positions):
        cache = model.apply(variables, 2, max_length, method=HourglassLM.init_cache)
        logits, cache = model.apply(variables, ids, cache, method=HourglassLM.prefill)
        following, _, _ = model.apply(
            variables, token, positions, cache, method=HourglassLM.decode_step
        )
        return logits, cache, following

    token = jnp.asarray([5, v.ids[1, 7]], jnp.int32)
    positions = jnp.asarray([LENGTH, 7], jnp.int32)
    args = (v.ids[:2], token, positions)
    logits, cache, following = compile_fast(prefill_then_step, *args)(*args)
    np.testing.assert_allclose(logits, v.logits[:2], atol=1e-5, rtol=0)
    assert jax.tree.structure(cache) == jax.tree.structure(stepped)
    got, want = position_slots(cache), position_slots(stepped)
    assert len(got) == len(want) == len(jax.tree.leaves(cache))  # every leaf is compared
    for (name, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
    # Row 0: the step after the prompt, as from the stepped cache; row 1: position 7 again, with the
    # token it had there, gives the full pass's logits at 7 (slots 7.. are rewritten in order).
    after, _, _ = model.apply(variables, token, LENGTH, stepped, method=HourglassLM.decode_step)
    np.testing.assert_allclose(following[0], after[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(following[1], v.logits[1, 7], atol=1e-5, rtol=0)


# --- Ragged prompts ----------------------------------------------------------------------------------

END_ID = 3
# Lengths 6, 3 and 1 (nothing to prefill) on the factor-2-and-4 model: the prompts end inside groups
# and on their boundaries at every level.
LONG, SHORT, ONE = [1, 5, 7, 2, 9, 4], [8, 2, 10], [11]
SEARCHES = {
    "greedy": dict(),
    "beam": dict(strategy=dec.BeamSearch(3)),
    "sampling": dict(sampler=dec.RandomSampler(topk=5), rng=jax.random.key(7)),
}


def continue_prompts(prompts, search, **kwargs):
    model, params, _ = search_model()
    return generate(
        model, params, prompts, end_id=END_ID, max_length=MAX_STEPS, **SEARCHES[search], **kwargs
    )


def assert_same_row(result, row, alone, alone_row=0):
    np.testing.assert_array_equal(result.ids[row], alone.ids[alone_row])
    np.testing.assert_array_equal(result.lengths[row], alone.lengths[alone_row])
    np.testing.assert_allclose(result.log_probs[row], alone.log_probs[alone_row], atol=1e-5)
    np.testing.assert_allclose(result.scores[row], alone.scores[alone_row], atol=1e-5)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_each_row_of_a_ragged_batch_decodes_as_it_does_alone(search):
    prompts = [LONG, SHORT, ONE]
    together = continue_prompts(prompts, search)
    for row, prompt in enumerate(prompts):
        assert_same_row(together, row, continue_prompts([prompt], search))
    if search == "beam":  # the padded array with its lengths is the same batch
        padded = np.zeros((3, len(LONG)), np.int32)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = prompt
        given = continue_prompts(padded, search, prompt_lengths=[6, 3, 1])
        np.testing.assert_array_equal(given.ids, together.ids)


def test_sampling_rows_do_not_depend_on_the_other_rows_lengths():
    """Sampling keys are per step and shared by the rows, each row drawing at its batch position:
    row 0 equals its batch of one; row 1 (padded here) equals row 1 of an unpadded batch of two."""
    first = continue_prompts([LONG, SHORT], "sampling")
    assert_same_row(first, 0, continue_prompts([LONG], "sampling"))
    assert_same_row(first, 1, continue_prompts([SHORT[::-1], SHORT], "sampling"), 1)
    # The draws are not all the same token (the check can fail: sampling happened).
    assert len(set(np.asarray(first.ids).ravel().tolist())) > 2


# --- Beam search through the origin tables -----------------------------------------------------------


def copied(state):
    """The same state with every cache reordered the plain way (whole rows gathered)."""
    return jax.tree.map(
        lambda x: x.replace(indirect=False) if isinstance(x, KVCache) else x,
        state,
        is_leaf=lambda x: isinstance(x, KVCache),
    )


def caches(state):
    kinds = (KVCache, BeamKVCache)
    return [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))]


def test_random_reorders_read_through_origin_tables_equal_copying_every_level():
    """Every cache of every level tiles to a BeamKVCache; under the same reorders it gives the
    logits that gathering whole rows gives, and the top level's slots are never moved."""
    model, params, _ = search_model()
    batch, width, steps = 2, 3, MAX_STEPS
    cache = model.apply({"params": params}, batch, steps, method=HourglassLM.init_cache)
    rows = batch * width
    ids = jax.random.randint(jax.random.key(3), (rows, steps), 0, 12)
    beams = np.random.default_rng(0).integers(0, width, (steps, rows))
    reorders = jnp.asarray(np.arange(rows) // width * width + beams, jnp.int32)

    def drive(state):
        def one(state, inputs):
            token, t, indices = inputs
            logits, state, _ = model.apply(
                {"params": params}, token, t, state, method=HourglassLM.decode_step
            )
            keys = [c.rows()[0] for c in (state.pre[0], state.stream)]  # [R, N, S, H] each
            written = [jax.lax.dynamic_index_in_dim(k, t, axis=2, keepdims=False) for k in keys]
            return reorder(state, indices), (logits, written)

        scan = lambda s: jax.lax.scan(one, s, (ids.T, jnp.arange(steps), reorders))
        return jax.jit(scan)(state)

    tiled = tile_batch(cache, width)
    assert len(caches(tiled)) == 9  # pre, post, stream, upsampling at 2 levels; the innermost layer
    assert all(isinstance(c, BeamKVCache) for c in caches(tiled))
    final, (got, written) = drive(tiled)
    final_copied, (want, _) = drive(tile_batch(copied(cache), width))
    assert all(isinstance(c, KVCache) for c in caches(final_copied))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    for cache_now, slots in zip((final.pre[0], final.stream), written, strict=True):
        keys, _ = cache_now.rows()
        np.testing.assert_array_equal(np.moveaxis(np.asarray(keys), 2, 0), slots)
    copied_keys, _ = final_copied.pre[0].rows()  # ... where the copying caches moved (can fail)
    assert not np.array_equal(np.moveaxis(np.asarray(copied_keys), 2, 0), written[0])


def test_ragged_beam_search_equals_the_search_over_copied_caches():
    model, params, _ = search_model()
    prompts, strategy = [LONG, SHORT, ONE], dec.BeamSearch(3, length_penalty=0.6)
    got = generate(model, params, prompts, end_id=END_ID, max_length=MAX_STEPS, strategy=strategy)
    adapter = adapter_for(model)
    padded = np.zeros((3, len(LONG)), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    lengths = jnp.asarray([6, 3, 1], jnp.int32)
    prepared = adapter.prepare(params, jnp.asarray(padded), lengths, None, MAX_STEPS)
    want = dec.dynamic_decode(
        step_function(adapter, params), prepared.start_ids, END_ID, copied(prepared.state),
        strategy=strategy, max_length=MAX_STEPS,
    )  # fmt: skip
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-5)
