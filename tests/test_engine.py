"""The serving engine (jaxformer/serving): every request's result is ``generate``'s for it alone.

Also what the engine needs below it: an encoder-decoder step at per-row positions, and the search
options that are data (one compile of ``generate`` for every penalty, temperature, top-p < 1 and
min_length, with the results of the static options).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import Transformer, generate, transformer_step_fn
from jaxformer import decoding as dec

from helpers import VARIANTS, make, source_batch

END = 2


@pytest.mark.parametrize(
    "overrides",
    [VARIANTS["pre_sinusoidal"], VARIANTS["post_relative"], dict(positions="learned"),
     dict(relative_attention_num_buckets=8, relative_attention_max_distance=6, positions="none")],
    ids=["sinusoidal", "shaw", "learned", "t5_buckets"],
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
            transformer_step_fn(model, params), jnp.ones([3], jnp.int32), END, cache,
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
