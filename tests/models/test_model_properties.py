"""Causality, padding invariance, fully padded inputs, and the presets' parameter shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import PRESETS, preset

from helpers import DecoderOnlyLM, Transformer, make, source_batch, with_embedding_offset

CAUSAL_VARIANTS = [dict(pre_norm=True), dict(pre_norm=False, maximum_relative_position=2)]


@pytest.mark.parametrize("overrides", CAUSAL_VARIANTS)
def test_decoder_only_is_causal_by_gradients(overrides):
    model, params = make(DecoderOnlyLM, **overrides)
    ids = jax.random.randint(jax.random.key(4), (1, 6), 1, 32)
    delta = jnp.zeros((1, 6, 32))
    for t in range(6):
        logits_t = lambda d, t=t: with_embedding_offset(
            lambda: model.apply({"params": params}, ids), d, "embedding"
        )[0, t].sum()
        grad = np.asarray(jax.grad(logits_t)(delta))  # [1, T, D]
        assert np.all(grad[:, t + 1 :] == 0.0), f"output {t} depends on a later input"
        assert np.abs(grad[:, : t + 1]).sum(axis=-1).min() > 0, f"output {t} ignores its past"


@pytest.mark.parametrize("overrides", CAUSAL_VARIANTS)
def test_encoder_decoder_target_side_is_causal_by_gradients(overrides):
    model, params = make(Transformer, **overrides)
    src = source_batch(batch=1, pad_lengths=(5,))
    tgt = jax.random.randint(jax.random.key(5), (1, 5), 1, 32)
    delta = jnp.zeros((1, 5, 32))
    for t in range(5):
        logits_t = lambda d, t=t: with_embedding_offset(
            lambda: model.apply({"params": params}, src, tgt), d, "target_embedding"
        )[0, t].sum()
        grad = np.asarray(jax.grad(logits_t)(delta))
        assert np.all(grad[:, t + 1 :] == 0.0)
        assert np.abs(grad[:, : t + 1]).sum(axis=-1).min() > 0


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model, params = make(DecoderOnlyLM, maximum_relative_position=2)
    ids = jax.random.randint(jax.random.key(6), (2, 8), 1, 32)
    base = model.apply({"params": params}, ids)
    changed = model.apply({"params": params}, ids.at[:, 5].set((ids[:, 5] + 1) % 32))
    np.testing.assert_array_equal(base[:, :5], changed[:, :5])
    assert not np.allclose(base[:, 5:], changed[:, 5:])


@pytest.mark.parametrize("overrides", [dict(), dict(maximum_relative_position=2, pre_norm=False)])
def test_source_padding_does_not_change_real_outputs(overrides):
    model, params = make(Transformer, **overrides)
    src = source_batch(batch=2, length=6, pad_lengths=(6, 3))
    tgt = jax.random.randint(jax.random.key(7), (2, 4), 1, 32)
    padded = model.apply({"params": params}, src, tgt)
    alone = model.apply({"params": params}, src[1:, :3], tgt[1:])  # the short source, unpadded
    np.testing.assert_allclose(padded[1], alone[0], atol=1e-5, rtol=0)
    more_padding = jnp.pad(src, ((0, 0), (0, 4)))  # padding the whole batch further
    np.testing.assert_allclose(
        model.apply({"params": params}, more_padding, tgt), padded, atol=1e-5
    )


def test_lm_right_padding_does_not_change_real_positions():
    model, params = make(DecoderOnlyLM)
    ids = jax.random.randint(jax.random.key(8), (1, 5), 1, 32)
    padded = jnp.pad(ids, ((0, 0), (0, 3)))
    valid = padded != 0
    a = model.apply({"params": params}, ids)
    b = model.apply({"params": params}, padded, valid)
    np.testing.assert_allclose(a, b[:, :5], atol=1e-5, rtol=0)


def test_an_all_padding_source_gives_finite_outputs():
    model, params = make(Transformer)
    src = jnp.zeros((2, 5), jnp.int32)
    tgt = jnp.ones((2, 3), jnp.int32)
    memory, valid = model.apply({"params": params}, src, method=Transformer.encode)
    logits, attention = model.apply(
        {"params": params}, tgt, memory, valid, method=Transformer.decode
    )
    assert np.isfinite(np.asarray(memory)).all() and np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(attention, 0.0)
    cache = model.apply({"params": params}, 2, 4, method=Transformer.init_cache)
    kv = model.apply({"params": params}, memory, valid, method=Transformer.init_memory)
    logits, _, attention = model.apply(
        {"params": params}, tgt[:, 0], 0, cache, kv, method=Transformer.decode_step
    )
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(attention, 0.0)


def expected_parameter_count(c) -> int:
    """Counted by hand from the architecture (biases and layer-norm scales/offsets included)."""
    d, f = c.d_model, c.ffn_dim
    attention = 4 * d * d + 4 * d  # q, k, v, out projections with biases
    ffn = 2 * d * f + f + d
    norm = 2 * d
    relative = 2 * (2 * c.maximum_relative_position + 1) * c.head_dim if c.relative else 0
    encoder = c.num_encoder_layers * (attention + relative + ffn + 2 * norm) + norm
    decoder = c.num_decoder_layers * (2 * attention + relative + ffn + 3 * norm) + norm
    source = 0 if c.share_embeddings else c.source_vocab_size * d  # one table when shared
    output = 0 if c.share_output_embeddings else d * c.vocab_size  # tied: the target table
    bias = c.vocab_size if c.has_output_bias else 0  # OpenNMT-tf keeps it when tied
    return encoder + decoder + c.vocab_size * d + source + output + bias


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_shape_check_at_no_cost(name):
    config = preset(name)
    model = Transformer(config)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert count == expected_parameter_count(config)
    out = jax.eval_shape(lambda p, s, t: model.apply({"params": p}, s, t), shapes, ids, ids)
    assert out.shape == (2, 16, config.vocab_size) and out.dtype == jnp.float32


def test_base_preset_is_the_paper_model():
    c = preset("base")
    assert (c.num_encoder_layers, c.num_decoder_layers, c.d_model, c.num_heads, c.ffn_dim) == (
        6,
        6,
        512,
        8,
        2048,
    )
    a = preset("article")
    assert (a.vocab_size, a.d_model, a.num_decoder_layers, a.num_heads, a.ffn_dim) == (
        26,
        6,
        1,
        2,
        12,
    )
    assert a.maximum_relative_position == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=30, num_heads=4), "num_heads"),
        (dict(dropout=1.0), "dropout"),
        (dict(share_embeddings=True, src_vocab_size=40), "share_embeddings"),
        (dict(pad_id=99), "pad_id"),
    ],
)
def test_configs_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **overrides)


def test_a_source_longer_than_max_len_is_refused():
    model, params = make(Transformer, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model.apply({"params": params}, jnp.ones((1, 9), jnp.int32), method=Transformer.encode)


def test_dropout_acts_only_in_training():
    model, params = make(Transformer, dropout=0.3, attention_dropout=0.3, ffn_dropout=0.3)
    src, tgt = source_batch(), jnp.ones((3, 4), jnp.int32)
    inference = model.apply({"params": params}, src, tgt)  # no dropout key needed
    np.testing.assert_array_equal(inference, model.apply({"params": params}, src, tgt))
    train = lambda seed: model.apply(
        {"params": params}, src, tgt, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    )
    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), inference)
