"""Beam search reads the KV cache through an origin table instead of copying it at every reorder.

The reference is the plain way: a cache whose rows are gathered whole at each reorder
(``KVCache(indirect=False)``). Both must give the same logits at every step, for any sequence of
reorders, and the same search results; the memory K/V are shared by the beams of an entry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import generate
from jaxformer.decoding import BeamSearch, adapter_for, dynamic_decode, step_function
from jaxformer.decoding.state import reorder, tile_batch
from jaxformer.models.cache import BeamKVCache, KVCache

from helpers import VARIANTS, DecoderOnlyLM, Transformer, make, source_batch

WIDTH, STEPS = 3, 6


def copied(cache):
    """The same cache, reordered the plain way (whole rows gathered)."""
    return jax.tree.map(
        lambda x: x.replace(indirect=False) if isinstance(x, KVCache) else x,
        cache,
        is_leaf=lambda x: isinstance(x, KVCache),
    )


def random_reorders(seed, batch):
    """Beam indices within each entry, as a search would produce: [STEPS, B*W]."""
    beams = np.random.default_rng(seed).integers(0, WIDTH, (STEPS, batch * WIDTH))
    return jnp.asarray(np.arange(batch * WIDTH) // WIDTH * WIDTH + beams, jnp.int32)


def drive(model, params, cache, ids, reorders, memory=None):
    """Decode STEPS tokens, reordering the cache after each step.

    Returns every step's logits, the final cache and, per step t, the first layer's keys that each
    row holds in slot t right after writing it (before the reorder) ``[STEPS, R, N, H]``.
    """
    extra = () if memory is None else (memory,)

    def step(cache, inputs):
        token, t, indices = inputs
        logits, cache, *_ = model.apply(
            {"params": params}, token, t, cache, *extra, method=type(model).decode_step
        )
        keys, _ = cache.self_attention[0].rows()  # [R, N, S, H]
        written = jax.lax.dynamic_index_in_dim(keys, t, axis=2, keepdims=False)  # [R, N, H]
        return reorder(cache, indices), (logits, written)

    steps = jnp.arange(STEPS, dtype=jnp.int32)
    scan = jax.jit(lambda c: jax.lax.scan(step, c, (ids.T, steps, reorders)))
    cache, (logits, written) = scan(cache)
    return logits, cache, written


CASES = [
    ("encoder_decoder", "pre_sinusoidal"),
    ("encoder_decoder", "post_relative"),
    ("encoder_decoder", "shared_embeddings"),
    ("decoder_only", "pre_relative"),
]


@pytest.mark.parametrize("family, variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_reading_through_the_origin_table_equals_copying_the_rows(family, variant):
    overrides = VARIANTS[variant]
    src = source_batch()
    batch = src.shape[0]
    if family == "encoder_decoder":
        model, params = make(Transformer, **overrides)
        encoded, valid = model.apply({"params": params}, src, method=Transformer.encode)
        cache = model.apply({"params": params}, batch, STEPS, method=Transformer.init_cache)
        memory = model.apply({"params": params}, encoded, valid, method=Transformer.init_memory)
    else:
        model, params = make(DecoderOnlyLM, **overrides)
        cache = model.apply({"params": params}, batch, STEPS, method=DecoderOnlyLM.init_cache)
        memory = None
    ids = jax.random.randint(jax.random.key(3), (batch * WIDTH, STEPS), 3, 32)
    reorders = random_reorders(0, batch)
    tiled = tile_batch(cache, WIDTH)
    assert all(isinstance(c, BeamKVCache) for c in tiled.self_attention)
    got, final, written = drive(model, params, tiled, ids, reorders, memory)
    want, final_copied, _ = drive(
        model, params, tile_batch(copied(cache), WIDTH), ids, reorders, memory
    )
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # The keys were never moved: row r's slot t holds what row r wrote at step t.
    assert final.self_attention[0].origin.shape == (batch * WIDTH, STEPS)
    keys, _ = final.self_attention[0].rows()  # [R, N, S, H]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(keys), 2, 0), written)
    # ... where the copying cache moved them (the check can fail).
    copied_keys, _ = final_copied.self_attention[0].rows()
    assert not np.array_equal(np.moveaxis(np.asarray(copied_keys), 2, 0), written)


def test_a_reorder_moves_the_origin_table_not_the_keys():
    cache = tile_batch(KVCache.zeros(2, 5, 2, 4, jnp.float32, indirect=True), WIDTH)
    cache = cache.write(jnp.ones([6, 1, 2, 4]), jnp.ones([6, 1, 2, 4]), 2)
    np.testing.assert_array_equal(cache.origin[:, 2], np.arange(6) % WIDTH)
    indices = jnp.asarray([2, 2, 0, 4, 3, 3], jnp.int32)
    moved = reorder(cache, indices)
    assert moved.k is cache.k and moved.v is cache.v
    np.testing.assert_array_equal(moved.origin, np.asarray(cache.origin)[np.asarray(indices)])
    k_rows, v_rows = cache.rows()  # [R, N, S, H]
    np.testing.assert_array_equal(k_rows[:, :, 2], 1.0)  # each row wrote slot 2 of its own beam
    plain = reorder(KVCache(k=k_rows, v=v_rows), indices)
    assert isinstance(plain, KVCache)  # the copy path gathers every leaf
    np.testing.assert_array_equal(plain.k, np.asarray(k_rows)[np.asarray(indices)])
    with pytest.raises(ValueError, match="tiled already"):
        tile_batch(cache, 2)


@pytest.mark.parametrize("overrides", [{}, VARIANTS["post_relative"]], ids=["pre", "post_rel"])
def test_beam_search_equals_the_copying_search_with_a_tiled_memory(overrides):
    """``generate`` (origin table, one memory per entry) == the plain search over the whole cache."""
    model, params = make(Transformer, **overrides)
    params = {**params, "output": jax.tree.map(lambda w: 4 * w, params["output"])}  # peaked
    src = source_batch()
    strategy = BeamSearch(WIDTH, length_penalty=0.6, coverage_penalty=0.2)
    got = generate(
        model, params, src, start_id=1, end_id=2, max_length=9, strategy=strategy,
        return_attention=True,
    )  # fmt: skip
    encoded, valid = model.apply({"params": params}, src, method=Transformer.encode)
    cache = model.apply({"params": params}, 3, 9, method=Transformer.init_cache)
    memory = model.apply({"params": params}, encoded, valid, method=Transformer.init_memory)
    step = step_function(adapter_for(model), params)

    def plain_step(ids, t, state):  # the memory is state here: tiled to every row, reordered
        cache, memory = state
        logits, cache, attention = step(ids, t, cache, memory)
        return logits, (cache, memory), attention

    want = dynamic_decode(
        plain_step, jnp.ones([3], jnp.int32), 2, (copied(cache), memory),
        strategy=strategy, max_length=9, attention_size=src.shape[1], return_attention=True,
    )  # fmt: skip
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-5)
    np.testing.assert_allclose(got.attention, want.attention, atol=1e-6)
