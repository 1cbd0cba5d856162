"""Cached one-token decoding equals the teacher-forced full pass, for every model and option."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from helpers import VARIANTS, DecoderOnlyLM, Transformer, make, source_batch

TARGET_LEN = 7


class CachedEqualsFullTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(name, overrides) for name, overrides in VARIANTS.items()])
    def test_encoder_decoder(self, overrides):
        model, params = make(Transformer, **overrides)
        src = source_batch()
        tgt = jax.random.randint(jax.random.key(2), (3, TARGET_LEN), 1, 32)
        memory, valid = model.apply({"params": params}, src, method=Transformer.encode)
        full, full_attention = model.apply(
            {"params": params}, tgt, memory, valid, method=Transformer.decode
        )
        cache = model.apply({"params": params}, 3, TARGET_LEN + 3, method=Transformer.init_cache)
        kv = model.apply({"params": params}, memory, valid, method=Transformer.init_memory)
        step = self.variant(
            lambda ids, t, cache, kv: model.apply(
                {"params": params}, ids, t, cache, kv, method=Transformer.decode_step
            )
        )
        for t in range(TARGET_LEN):
            logits, cache, attention = step(tgt[:, t], jnp.int32(t), cache, kv)
            chex.assert_shape(logits, (3, 32))
            np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
            np.testing.assert_allclose(attention, full_attention[:, t], atol=1e-6, rtol=0)
        # Attention never lands on source padding.
        np.testing.assert_array_equal(np.asarray(attention)[~np.asarray(valid)], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(name, overrides) for name, overrides in VARIANTS.items()])
    def test_decoder_only(self, overrides):
        overrides = {k: v for k, v in overrides.items() if k != "share_embeddings"}
        model, params = make(DecoderOnlyLM, **overrides)
        ids = jax.random.randint(jax.random.key(3), (2, 9), 1, 32)
        full = model.apply({"params": params}, ids)
        step = self.variant(
            lambda ids, t, cache: model.apply(
                {"params": params}, ids, t, cache, method=DecoderOnlyLM.decode_step
            )
        )
        # Prefill a 4-token prompt in one pass, then continue one token at a time.
        cache = model.apply({"params": params}, 2, 12, method=DecoderOnlyLM.init_cache)
        prefill = self.variant(
            lambda ids, cache: model.apply(
                {"params": params}, ids, cache, method=DecoderOnlyLM.prefill
            )
        )
        logits, cache = prefill(ids[:, :4], cache)
        np.testing.assert_allclose(logits, full[:, :4], atol=1e-5, rtol=0)
        for t in range(4, 9):
            logits, cache, none = step(ids[:, t], jnp.int32(t), cache)
            assert none is None
            np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)


def test_a_cached_step_projects_one_token_and_reuses_the_memory_kv():
    model, params = make(Transformer)
    src = source_batch()
    memory, valid = model.apply({"params": params}, src, method=Transformer.encode)
    cache = model.apply({"params": params}, 3, 10, method=Transformer.init_cache)
    kv = model.apply({"params": params}, memory, valid, method=Transformer.init_memory)
    calls = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.DenseGeneral) and context.method_name == "__call__":
            calls.append((context.module.name, args[0].shape))
        return next_fun(*args, **kwargs)

    ids = jnp.array([5, 6, 7])
    for t in range(3):
        with nn.intercept_methods(record):
            _, new_cache, _ = model.apply(
                {"params": params}, ids, t, cache, kv, method=Transformer.decode_step
            )
        # The Q/K/V projections (fused qkv, cross query) see one token; the memory K/V are never
        # recomputed ("kv" is the cross-attention K/V projection).
        names = [name for name, _ in calls]
        assert names.count("qkv") == 2 and names.count("query") == 2 and "kv" not in names
        assert all(shape == (3, 1, 32) for name, shape in calls if name in ("qkv", "query"))
        calls.clear()
        # The memory is an argument of the step, not part of the state it returns.
        assert set(vars(new_cache)) == {"self_attention"}
        # Self-attention K/V: preallocated to the maximum length, heads-major [B, N, S, H], slot t
        # written, later slots empty.
        for layer in new_cache.self_attention:
            chex.assert_shape([layer.k, layer.v], (3, 4, 10, 8))
            assert np.abs(np.asarray(layer.k[:, :, t])).sum() > 0
            np.testing.assert_array_equal(layer.k[:, :, t + 1 :], 0.0)
        cache = new_cache
    # The memory K/V are the projections of the encoder output.
    layer0 = model.bind({"params": params}).decoder.layers[0]
    np.testing.assert_allclose(kv.kv[0].k, layer0.memory_kv(memory).k, atol=1e-6)
