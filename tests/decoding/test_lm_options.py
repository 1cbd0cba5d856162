"""The options of decoder-only checkpoints: rotary positions, grouped-query attention, the sliding
window, Gemma's norm, Qwen2's output bias (``TransformerConfig``'s docstring).

For each family of ``helpers.LM_VARIANTS``: the logits against an independent NumPy forward pass
(float64, written with loops), prefill and cached steps against the full pass (shared, per-row and
ragged positions), causality by gradients, right-padding invariance; with grouped key/value heads,
the beam cache's origin table against copying rows. Then each option against its formula or an
equivalent model, a full-size config shape-checked at no cost, and the configs' checks.
"""

import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import TransformerConfig, preset
from jaxformer.decoding.state import reorder, tile_batch
from jaxformer.models.cache import KVCache
from jaxformer.models.rotary import RopeScaling, Rotary, inverse_frequencies
from jaxformer.training.experiment import ExperimentConfig, from_dict, to_dict

from helpers import (
    LM_VARIANTS,
    DecoderOnlyLM,
    Transformer,
    as_a_user,
    make,
    source_batch,
    with_embedding_offset,
)
from reference_lm import numpy_inverse_frequencies, numpy_lm, numpy_rope

NAMES = list(LM_VARIANTS)


def randomized(seed=0, **overrides):
    """A DecoderOnlyLM whose norm scales and biases (initialised at 1 or 0) are made random too, so
    that a path that forgets or misplaces one is seen."""
    model, params = make(DecoderOnlyLM, seed, **overrides)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    shaken = [
        x + 0.3 * jax.random.normal(key, x.shape) if str(path[-1].key) in ("scale", "bias") else x
        for (path, x), key in zip(leaves, keys, strict=True)
    ]
    return model, jax.tree.unflatten(tree, shaken)


# --- Every family: NumPy, cached steps, causality, padding ---------------------------------------


@functools.cache
def family(name):
    """The model of ``LM_VARIANTS[name]`` and its jitted entry points, compiled once per process."""
    model, params = randomized(**LM_VARIANTS[name])
    apply = lambda method: jax.jit(
        lambda *args: model.apply({"params": params}, *args, method=method)
    )
    return SimpleNamespace(
        model=model,
        params=params,
        full=apply(DecoderOnlyLM.__call__),
        prefill=apply(DecoderOnlyLM.prefill),
        step=apply(DecoderOnlyLM.decode_step),
        cache=lambda batch, length: model.apply(
            {"params": params}, batch, length, method=DecoderOnlyLM.init_cache
        ),
    )


IDS = jax.random.randint(jax.random.key(3), (2, 8), 1, 32)  # 8 > the sliding window of 3
VALID = jnp.ones(IDS.shape, bool)


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_an_independent_numpy_forward_pass(name):
    lm = family(name)
    expected = numpy_lm(lm.model.config, lm.params, IDS)
    np.testing.assert_allclose(lm.full(IDS, VALID), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_steps_equal_the_full_pass_at_shared_per_row_and_ragged_positions(name):
    lm = family(name)
    full = lm.full(IDS, VALID)
    logits, cache = lm.prefill(IDS[:, :3], lm.cache(2, 10))
    np.testing.assert_allclose(logits, full[:, :3], atol=1e-5, rtol=0)
    for t in range(3, 8):  # past the sliding window of 3
        position = jnp.int32(t) if t < 5 else jnp.full((2,), t, jnp.int32)
        logits, cache, _ = lm.step(IDS[:, t], position, cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
    # Ragged prompts of 3 and 6 tokens, right-padded and prefilled as ``generate`` does (all but
    # the last token; the padding's slots are overwritten before anything reads them).
    prompts = IDS[:, :6].at[0, 3:].set(0)
    _, cache = lm.prefill(prompts[:, :5], lm.cache(2, 10))
    for offset in range(3):
        positions = jnp.asarray([2, 5], jnp.int32) + offset  # each row at its own position
        logits, cache, _ = lm.step(IDS[jnp.arange(2), positions], positions, cache)
        np.testing.assert_allclose(logits, full[jnp.arange(2), positions], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_causal_by_gradients_and_right_padding_changes_nothing(name):
    lm = family(name)
    ids = IDS[:1, :5]
    out = lambda d: with_embedding_offset(
        lambda: lm.model.apply({"params": lm.params}, ids), d, "embedding"
    )[0].sum(-1)  # [T]
    jacobian = jax.jit(jax.jacrev(out))(jnp.zeros((1, 5, 32)))  # [T, 1, T, D]
    size = np.abs(np.asarray(jacobian)).sum(axis=(1, 3))  # [T out, T in]
    np.testing.assert_array_equal(np.triu(size, 1), 0.0)
    # 2 layers of a window of 3 still reach 4 positions back: every earlier input counts here.
    assert size[np.tri(5, dtype=bool)].min() > 0
    padded = jnp.pad(IDS, ((0, 0), (0, 3)))  # [2, 11]
    full = lm.full(IDS, VALID)
    np.testing.assert_allclose(lm.full(padded, padded != 0)[:, :8], full, atol=1e-5, rtol=0)


def test_the_beam_origin_table_with_grouped_heads_and_a_window_equals_copying_the_rows():
    lm = family("mistral_like")  # one key/value head, a window of 3
    width, steps, batch = 3, 6, 2  # 6 steps: past the window
    cache = lm.cache(batch, steps)
    plain = jax.tree.map(
        lambda x: x.replace(indirect=False) if isinstance(x, KVCache) else x,
        cache,
        is_leaf=lambda x: isinstance(x, KVCache),
    )
    ids = jax.random.randint(jax.random.key(3), (steps, batch * width), 3, 32)
    beams = np.random.default_rng(0).integers(0, width, (steps, batch * width))
    reorders = jnp.asarray(np.arange(batch * width) // width * width + beams, jnp.int32)

    def body(state, inputs):
        token, t, indices = inputs
        logits, state, _ = lm.model.apply(
            {"params": lm.params}, token, t, state, method=DecoderOnlyLM.decode_step
        )
        return reorder(state, indices), logits

    scan = jax.jit(lambda start: jax.lax.scan(body, start, (ids, jnp.arange(steps), reorders))[1])
    tiled = tile_batch(cache, width)
    assert tiled.self_attention[0].k.shape == (batch, 1, width, steps, 8)  # [B, K, W, S, H]
    np.testing.assert_allclose(scan(tiled), scan(tile_batch(plain, width)), atol=2e-5, rtol=0)


# --- Rotary positions against their formulas -----------------------------------------------------

# At H = 16 and theta 10000 the wavelengths run from 6.3 to 19869: with L = 256 and the factors
# 1 / 4 (bounds 256 and 64), three frequencies are kept, one blended and four divided.
LLAMA3_AT_16 = RopeScaling(
    "llama3", 8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
)
SCALINGS = [None, RopeScaling("linear", 4.0), LLAMA3_AT_16]


@pytest.mark.parametrize("scaling", SCALINGS, ids=["none", "linear", "llama3"])
def test_rotary_positions_against_numpy_rotate_half(scaling):
    theta = 500000.0 if scaling is None else 10000.0
    freqs = numpy_inverse_frequencies(16, theta, scaling)
    np.testing.assert_allclose(inverse_frequencies(16, theta, scaling), freqs, rtol=1e-7)
    if scaling is LLAMA3_AT_16:  # every regime of the llama3 formula is exercised
        plain = numpy_inverse_frequencies(16, theta, None)
        ratio = freqs / plain
        assert (ratio == 1).sum() == 3 and (ratio == 1 / 8).sum() == 4
        assert 1 / 8 < ratio[3] < 1
    rotary = Rotary(16, theta, scaling)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3, 16)))
    shared = jnp.arange(5)
    per_row = jnp.asarray([[0, 1, 2, 3, 4], [7, 30, 31, 90, 100]])
    for positions in (shared, per_row):
        got = rotary(jnp.asarray(x), positions)
        rows = np.broadcast_to(np.asarray(positions), (2, 5))
        np.testing.assert_allclose(got, numpy_rope(x, rows, freqs), atol=2e-5, rtol=0)


def test_rope_scaling_is_refused_by_name_and_read_from_a_mapping():
    llama3 = dict(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    config = preset("tiny", positions="rotary", rope_scaling={"rope_type": "llama3", **llama3})
    assert config.rope_scaling == RopeScaling("llama3", **llama3)
    hash(config)  # a static jit argument
    older = preset("tiny", positions="rotary", rope_scaling={"type": "linear", "factor": 2.0})
    assert older.rope_scaling == RopeScaling("linear", 2.0)
    # Saved with a run's config.json and read back.
    run = ExperimentConfig(model=config)
    assert from_dict(json.loads(json.dumps(to_dict(run)))) == run
    with pytest.raises(
        ValueError, match=r"rope_type must be one of \['linear', 'llama3'\], got 'yarn'"
    ):
        preset("tiny", positions="rotary", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_scaling has unknown keys \['beta_fast'\]"):
        preset(
            "tiny",
            positions="rotary",
            rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32.0},
        )
    with pytest.raises(ValueError, match="high_freq_factor must be a number > low_freq_factor"):
        RopeScaling("llama3", 8.0, 1.0, 1.0, 8192)


# --- Grouped-query attention ---------------------------------------------------------------------


def test_as_many_key_value_heads_as_heads_is_todays_attention():
    model, params = make(DecoderOnlyLM)
    same, same_params = make(DecoderOnlyLM, num_kv_heads=4)
    assert jax.tree.map(np.shape, same_params) == jax.tree.map(np.shape, params)  # fused qkv
    logits = lambda model: jax.jit(lambda ids: model.apply({"params": params}, ids))(IDS)
    np.testing.assert_array_equal(logits(same), logits(model))


def test_grouped_query_attention_equals_attention_with_each_key_value_head_repeated():
    """Qwen2-like (K = 2 of N = 4, biases on q, k, v): the same model written as plain multi-head
    attention, whose heads 2k and 2k+1 both hold key/value head k."""
    lm = family("qwen2_like")
    mha = DecoderOnlyLM(lm.model.config.replace(num_kv_heads=None))
    params = jax.tree.map(np.asarray, lm.params)
    decoder = dict(params["decoder"])
    for name, layer in decoder.items():
        if not name.startswith("layer_"):
            continue
        attention = layer["self_attention"]
        repeated = lambda kv, axis: np.repeat(kv, 2, axis=axis)  # K = 2 heads --> N = 4
        qkv = {
            "kernel": np.concatenate(
                [attention["query"]["kernel"][:, None], repeated(attention["kv"]["kernel"], 2)], 1
            ),  # [D, 3, N, H]
            "bias": np.concatenate(
                [attention["query"]["bias"][None], repeated(attention["kv"]["bias"], 1)], 0
            ),  # [3, N, H]
        }
        decoder[name] = {**layer, "self_attention": {"qkv": qkv, "out": attention["out"]}}
    got = mha.apply({"params": {**params, "decoder": decoder}}, IDS)
    np.testing.assert_allclose(got, lm.full(IDS, VALID), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_the_caches_hold_the_key_value_heads_only(kv_heads):
    model = DecoderOnlyLM(preset("tiny", num_kv_heads=kv_heads))
    cache = jax.eval_shape(
        lambda: model.apply({"params": {}}, 2, 16, method=DecoderOnlyLM.init_cache)
    )
    layer = cache.self_attention[0]
    assert layer.k.shape == layer.v.shape == (2, kv_heads, 16, 8)  # [B, K, S, H]
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert size == 2 * 2 * (2 * kv_heads * 16 * 8) * 4  # layers, k and v, B*K*S*H, float32
    tiled = jax.eval_shape(lambda c: tile_batch(c, 3), cache)  # a BeamKVCache: [B, K, W, S, H]
    assert tiled.self_attention[0].k.shape == (2, kv_heads, 3, 16, 8)


# --- The sliding window --------------------------------------------------------------------------


def test_a_window_at_least_the_length_changes_nothing():
    lm = family("mistral_like")
    logits = lambda window: jax.jit(
        lambda ids: DecoderOnlyLM(lm.model.config.replace(sliding_window=window)).apply(
            {"params": lm.params}, ids
        )
    )(IDS)
    expected = logits(None)
    np.testing.assert_array_equal(logits(8), expected)
    assert not np.allclose(lm.full(IDS, VALID), expected, atol=1e-3)  # the window of 3 matters


def test_a_token_beyond_the_window_has_exactly_zero_influence():
    """Window 3, 2 layers: output t reads inputs t-4 .. t (t-2 .. t through each layer) and nothing
    earlier, exactly."""
    lm = family("mistral_like")
    out = lambda d: with_embedding_offset(
        lambda: lm.model.apply({"params": lm.params}, IDS[:1]), d, "embedding"
    )[0].sum(-1)  # [T]
    jacobian = jax.jit(jax.jacrev(out))(jnp.zeros((1, 8, 32)))  # [T, 1, T, D]
    size = np.abs(np.asarray(jacobian)).sum(axis=(1, 3))  # [T out, T in]
    distance = np.arange(8)[:, None] - np.arange(8)[None, :]  # t - j
    reach = (distance >= 0) & (distance <= 2 * (3 - 1))
    np.testing.assert_array_equal(size[~reach], 0.0)
    assert size[reach].min() > 0


# --- Gemma, Qwen2, a full-size Llama --------------------------------------------------------------


def test_a_llama_3_2_1b_shaped_config_has_its_parameter_count_at_no_cost():
    config = TransformerConfig(
        vocab_size=128256,
        d_model=2048,
        num_heads=32,
        num_kv_heads=8,
        num_encoder_layers=0,
        num_decoder_layers=16,
        ffn_dim=8192,
        max_len=131072,
        positions="rotary",
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        norm="rms",
        layer_norm_epsilon=1e-5,
        activation="swiglu",
        attention_bias=False,
        ffn_bias=False,
        embedding_scale=1.0,
        share_output_embeddings=True,
    )
    model = DecoderOnlyLM(config)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    d, f, v, n, k, h = 2048, 8192, 128256, 32, 8, 64
    attention = d * n * h + 2 * d * k * h + n * h * d  # query, kv (K heads), out; no biases
    layer = attention + 3 * d * f + 2 * d  # gated feed-forward (3 matrices), two RMS norms
    expected = v * d + 16 * layer + d  # tied embedding, 16 layers, final norm
    assert expected == 1_235_814_400
    assert sum(x.size for x in jax.tree.leaves(shapes)) == expected
    attention_shapes = jax.tree.map(np.shape, shapes["decoder"]["layer_0"]["self_attention"])
    assert attention_shapes == {
        "query": {"kernel": (d, n, h)},
        "kv": {"kernel": (d, 2, k, h)},
        "out": {"kernel": (n, h, d)},
    }
    logits = jax.eval_shape(lambda p, i: model.apply({"params": p}, i), shapes, ids)
    assert logits.shape == (1, 8, v) and logits.dtype == jnp.float32


def test_qwen2_has_query_key_value_biases_but_none_on_the_output():
    attention = family("qwen2_like").params["decoder"]["layer_0"]["self_attention"]
    assert set(attention["query"]) == set(attention["kv"]) == {"kernel", "bias"}
    assert set(attention["out"]) == {"kernel"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(num_kv_heads=3),
            r"num_kv_heads must be None \(num_heads\) or an int >= 1 that divides",
        ),
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(sliding_window=0), r"sliding_window must be None \(no window\) or an int >= 1"),
        (dict(rope_theta=0.0), "rope_theta must be a number > 0"),
        (dict(rope_scaling=RopeScaling("linear", 2.0)), "rope_scaling needs positions='rotary'"),
        (dict(positions="rotary", attention_head_dim=5), "rotary.*even head width, got 5"),
        (dict(attention_out_bias="no"), "attention_out_bias must be None"),
        (dict(norm="gemma"), r"norm must be one of \['layer', 'rms', 'gemma_rms'\]"),
    ],
)
def test_configs_that_cannot_work_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message), as_a_user():
        preset("tiny", **overrides)


def test_the_encoder_decoder_with_rotary_positions_and_grouped_heads():
    """Rotary positions in both stacks' self-attention, 2 key/value heads in every attention (the
    cross-attention's memory too): cached steps equal teacher forcing, source padding changes
    nothing."""
    options = dict(positions="rotary", num_kv_heads=2, attention_out_bias=False)
    model, params = make(Transformer, **options)
    run = lambda method: jax.jit(lambda *a: model.apply({"params": params}, *a, method=method))
    src = source_batch()  # [3, 6], rows of 6, 4 and 2 tokens
    tgt = jax.random.randint(jax.random.key(2), (3, 6), 1, 32)
    encoded, valid = run(Transformer.encode)(src)
    full, full_attention = run(Transformer.decode)(tgt, encoded, valid)
    memory = run(Transformer.init_memory)(encoded, valid)
    assert memory.kv[0].k.shape == (3, 2, 6, 8)  # [B, K, S, H]
    cache = model.apply({"params": params}, 3, 6, method=Transformer.init_cache)
    step = run(Transformer.decode_step)
    for t in range(6):
        logits, cache, attention = step(tgt[:, t], jnp.int32(t), cache, memory)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
        np.testing.assert_allclose(attention, full_attention[:, t], atol=1e-6, rtol=0)
    alone = run(Transformer.__call__)(src[2:, :2], tgt[2:])  # the 2-token source, unpadded
    np.testing.assert_allclose(full[2:], alone, atol=1e-5, rtol=0)


def test_the_encoder_decoder_refuses_a_sliding_window():
    with pytest.raises(ValueError, match="sliding_window=4 is for decoder-only LMs"):
        make(Transformer, sliding_window=4)
