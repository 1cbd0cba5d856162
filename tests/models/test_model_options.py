"""The model options of other implementations (TransformerConfig's fields after ``dtype``).

For every option combination of ``helpers.OPTION_VARIANTS``: cached one-token decoding equals the full
teacher-forced pass, the target side is causal, source padding changes no real output. Then each
option against an independent NumPy computation of its formula, the defaults against today's
parameters, old run configs, and the CTranslate2 export's refusals.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import TransformerConfig, preset
from jaxformer.interop import ids_vocab
from jaxformer.interop.ctranslate2 import _check_model
from jaxformer.models.activations import resolve_activation
from jaxformer.models.attention import MultiHeadAttention
from jaxformer.models.layers import FeedForward, config_norm
from jaxformer.training.experiment import ExperimentConfig, from_dict, to_dict

from helpers import (
    OPTION_VARIANTS,
    DecoderOnlyLM,
    Transformer,
    make,
    source_batch,
    with_embedding_offset,
)

NAMES = list(OPTION_VARIANTS)
TARGET_LEN = 6


def make_with_biases(model_cls, **overrides):
    """A model whose zero-initialised biases (final_logits_bias, tied output_bias) are made random,
    so that a path that forgets them is seen."""
    model, params = make(model_cls, **overrides)
    params = dict(params)
    for i, name in enumerate(("final_logits_bias", "output_bias")):
        if name in params:
            params[name] = jax.random.normal(jax.random.key(10 + i), params[name].shape)
    return model, params


def lm_overrides(name):
    return {k: v for k, v in OPTION_VARIANTS[name].items() if k != "share_embeddings"}


@pytest.mark.parametrize("name", NAMES)
def test_encoder_decoder_cached_steps_equal_the_full_pass(name):
    model, params = make_with_biases(Transformer, **OPTION_VARIANTS[name])
    run = lambda method, *args: model.apply({"params": params}, *args, method=method)
    src = source_batch()
    tgt = jax.random.randint(jax.random.key(2), (3, TARGET_LEN), 1, 32)
    encoded, valid = run(Transformer.encode, src)
    full, full_attention = run(Transformer.decode, tgt, encoded, valid)
    cache = run(Transformer.init_cache, 3, TARGET_LEN + 2)
    memory = run(Transformer.init_memory, encoded, valid)
    step = jax.jit(lambda ids, t, cache: run(Transformer.decode_step, ids, t, cache, memory))
    for t in range(TARGET_LEN):
        logits, cache, attention = step(tgt[:, t], jnp.int32(t), cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
        np.testing.assert_allclose(attention, full_attention[:, t], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_decoder_only_prefill_and_steps_equal_the_full_pass(name):
    model, params = make_with_biases(DecoderOnlyLM, **lm_overrides(name))
    run = lambda method, *args: model.apply({"params": params}, *args, method=method)
    ids = jax.random.randint(jax.random.key(3), (2, 8), 1, 32)
    full = model.apply({"params": params}, ids)
    logits, cache = run(DecoderOnlyLM.prefill, ids[:, :3], run(DecoderOnlyLM.init_cache, 2, 10))
    np.testing.assert_allclose(logits, full[:, :3], atol=1e-5, rtol=0)
    step = jax.jit(lambda ids, t, cache: run(DecoderOnlyLM.decode_step, ids, t, cache))
    for t in range(3, 8):
        # Per-row positions ([R]) for the last steps: the same positions, given row by row.
        position = jnp.int32(t) if t < 6 else jnp.full((2,), t, jnp.int32)
        logits, cache, _ = step(ids[:, t], position, cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)


def _assert_causal(jacobian):
    """``jacobian [T, 1, T, D]``: output t against input embeddings."""
    size = np.abs(np.asarray(jacobian)).sum(axis=(1, 3))  # [T out, T in]
    length = size.shape[0]
    for t in range(length):
        assert np.all(size[t, t + 1 :] == 0.0), f"output {t} depends on a later input"
        assert size[t, : t + 1].min() > 0, f"output {t} ignores part of its past"


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_causal_by_gradients(name):
    model, params = make_with_biases(DecoderOnlyLM, **lm_overrides(name))
    ids = jax.random.randint(jax.random.key(4), (1, 5), 1, 32)
    out = lambda d: with_embedding_offset(
        lambda: model.apply({"params": params}, ids), d, "embedding"
    )[0].sum(-1)  # [T]
    _assert_causal(jax.jacrev(out)(jnp.zeros((1, 5, 32))))
    # Separate tables, so that the offset reaches the target side only.
    model, params = make_with_biases(
        Transformer, **{**OPTION_VARIANTS[name], "share_embeddings": False}
    )
    src = source_batch(batch=1, pad_lengths=(5,))
    out = lambda d: with_embedding_offset(
        lambda: model.apply({"params": params}, src, ids), d, "target_embedding"
    )[0].sum(-1)
    _assert_causal(jax.jacrev(out)(jnp.zeros((1, 5, 32))))


@pytest.mark.parametrize("name", NAMES)
def test_source_padding_does_not_change_real_outputs(name):
    model, params = make_with_biases(Transformer, **OPTION_VARIANTS[name])
    src = source_batch(batch=2, length=6, pad_lengths=(6, 3))
    tgt = jax.random.randint(jax.random.key(7), (2, 4), 1, 32)
    padded = model.apply({"params": params}, src, tgt)
    alone = model.apply({"params": params}, src[1:, :3], tgt[1:])
    np.testing.assert_allclose(padded[1], alone[0], atol=1e-5, rtol=0)
    more = model.apply({"params": params}, jnp.pad(src, ((0, 0), (0, 3))), tgt)
    np.testing.assert_allclose(more, padded, atol=1e-5, rtol=0)


# --- Each option against an independent NumPy computation -----------------------------------------


def opennmt_tf_sinusoids(length, depth):
    """OpenNMT-tf 2.32's SinusoidalPositionEncoder, written out: positions 1..T, rates
    10000^(-i / (D/2 - 1)), [sin | cos]."""
    half = depth // 2
    out = np.zeros((length, depth))
    for p in range(length):
        for i in range(half):
            angle = (p + 1) * math.exp(-i * math.log(10000.0) / (half - 1))
            out[p, i], out[p, half + i] = math.sin(angle), math.cos(angle)
    return out


def embed_only(overrides, ids):
    """The embedding output of a DecoderOnlyLM (tokens, positions, norm) and its parameters."""
    model, params = make(DecoderOnlyLM, **overrides)
    bound = model.bind({"params": params})
    return np.asarray(bound._embed(ids, jnp.arange(ids.shape[1]))), jax.tree.map(np.asarray, params)


def test_opennmt_tf_sinusoids_start_at_one_concatenate_and_spread_rates_over_half_minus_one():
    from helpers import OPENNMT_TF_SINUSOIDS

    ids = jnp.arange(3, 10)[None]  # [1, 7]
    x, params = embed_only(OPENNMT_TF_SINUSOIDS, ids)
    tokens = np.asarray(params["embedding"]["embedding"])[np.asarray(ids[0])] * math.sqrt(32)
    np.testing.assert_allclose(x[0], tokens + opennmt_tf_sinusoids(7, 32), atol=1e-5, rtol=0)


def test_fairseq_m2m100_sinusoids_with_padding_idx_offset():
    # Fairseq's SinusoidalPositionalEmbedding.get_embedding, written out (padding_idx 1: the first
    # token is at position 2).
    half = 16
    rates = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
    positions = np.arange(2, 2 + 5)[:, None]
    expected = np.concatenate([np.sin(positions * rates), np.cos(positions * rates)], axis=1)
    overrides = dict(position_layout="concat", position_rate_denominator="D/2-1", position_offset=2)
    ids = jnp.arange(3, 8)[None]
    x, params = embed_only(dict(embedding_scale=1.0, **overrides), ids)
    tokens = np.asarray(params["embedding"]["embedding"])[np.asarray(ids[0])]
    np.testing.assert_allclose(x[0], tokens + expected, atol=1e-5, rtol=0)


def test_learned_positions_with_offset_and_embedding_norm():
    overrides = dict(
        positions="learned", position_offset=2, embedding_norm=True, layer_norm_epsilon=1e-5
    )
    ids = jnp.arange(3, 8)[None]
    x, params = embed_only(dict(embedding_scale=3.0, **overrides), ids)
    table = np.asarray(params["positions"]["embedding"])
    assert table.shape == (128 + 2, 32)
    h = np.asarray(params["embedding"]["embedding"])[np.asarray(ids[0])] * 3.0 + table[2:7]
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    norm = params["embedding_norm"]
    expected = (h - mean) / np.sqrt(var + 1e-5) * norm["scale"] + norm["bias"]
    np.testing.assert_allclose(x[0], expected, atol=1e-5, rtol=0)


def test_bart_shares_tokens_but_not_positions_or_embedding_norms():
    _model, params = make(Transformer, **OPTION_VARIANTS["bart_like"])
    assert "source_embedding" not in params
    for side in ("source", "target"):
        assert params[f"{side}_positions"]["embedding"].shape == (128 + 2, 32)
        assert set(params[f"{side}_embedding_norm"]) == {"scale", "bias"}


@pytest.mark.parametrize("epsilon", [1e-6, 1e-3])
def test_layer_norm_epsilon_and_rms_norm_against_numpy(epsilon):
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 8))) * 0.05  # small: eps matters
    for kind in ("layer", "rms", "gemma_rms"):
        config = preset("tiny", norm=kind, layer_norm_epsilon=epsilon)
        norm = config_norm(config, "n")
        params = norm.init(jax.random.key(1), x)["params"]
        scale = np.asarray(jax.random.normal(jax.random.key(2), (8,)))
        params = {**params, "scale": scale}
        got = np.asarray(norm.apply({"params": params}, x))
        if kind == "gemma_rms":  # Gemma: the weight is stored as its offset from 1
            np.testing.assert_array_equal(norm.init(jax.random.key(1), x)["params"]["scale"], 0.0)
            expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + epsilon) * (1.0 + scale)
        elif kind == "rms":
            assert set(params) == {"scale"}  # no bias
            expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + epsilon) * scale
        else:
            centred = x - x.mean(-1, keepdims=True)
            expected = centred / np.sqrt(x.var(-1, keepdims=True) + epsilon) * scale
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


NUMPY_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: (
        0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    ),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
}


@pytest.mark.parametrize(
    "name",
    [*NUMPY_ACTIVATIONS, "gated-gelu", "gated-gelu_tanh", "gated-silu", "geglu", "swiglu"],
)
def test_feed_forward_activations_against_numpy(name):
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 8)))
    ffn = FeedForward(8, 16, activation=name, use_bias=name != "relu")
    params = ffn.init(jax.random.key(1), jnp.asarray(x))["params"]
    got = np.asarray(ffn.apply({"params": params}, jnp.asarray(x)))
    params = jax.tree.map(np.asarray, params)
    base = {"geglu": "gelu", "swiglu": "silu"}.get(name, name).removeprefix("gated-")
    act = NUMPY_ACTIVATIONS[base]
    dense = lambda p, h: h @ np.asarray(p["kernel"]) + np.asarray(p.get("bias", 0.0))
    h = act(dense(params["inner"], x))
    assert ("inner_linear" in params) == (name not in NUMPY_ACTIVATIONS)
    if "inner_linear" in params:  # T5 v1.1: act(x wi_0) * (x wi_1)
        h = h * dense(params["inner_linear"], x)
    assert ("bias" in params["outer"]) == (name != "relu")
    np.testing.assert_allclose(got, dense(params["outer"], h), atol=1e-5, rtol=1e-5)


def test_gelu_is_exact_and_gelu_tanh_differs_from_it():
    x = jnp.linspace(-3, 3, 61)
    exact, _ = resolve_activation("gelu")
    approx, _ = resolve_activation("gelu_tanh")
    assert float(jnp.abs(exact(x) - approx(x)).max()) > 1e-5


@pytest.mark.parametrize("query_scaling", [True, False])
def test_attention_with_its_own_head_width_no_biases_and_no_query_scaling(query_scaling):
    n, h = 2, 5  # N*H = 10, unlike D = 8
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, 4, 8)))
    attention = MultiHeadAttention(n, 8, head_dim=h, query_scaling=query_scaling, use_bias=False)
    params = attention.init(jax.random.key(1), jnp.asarray(x))["params"]
    assert jax.tree.map(np.shape, params) == {
        "qkv": {"kernel": (8, 3, n, h)},
        "out": {"kernel": (n, h, 8)},
    }
    out, _ = attention.apply({"params": params}, jnp.asarray(x))
    qkv = np.einsum("btd,dcnh->cbtnh", x, np.asarray(params["qkv"]["kernel"]))
    scores = np.einsum("btnh,bsnh->bnts", qkv[0], qkv[1])
    if query_scaling:
        scores = scores / math.sqrt(h)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("bnts,bsnh->btnh", probs, qkv[2])
    expected = np.einsum("btnh,nhd->btd", heads, np.asarray(params["out"]["kernel"]))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_t5_like_model_has_no_biases_and_its_inner_width():
    _model, params = make(Transformer, **OPTION_VARIANTS["t5_like"])
    names = [
        "/".join(str(k.key) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    # Only the relative position bias tables (one per stack), no projection or output biases.
    assert [n for n in names if n.endswith("bias")] == [
        "decoder/relative_attention_bias",
        "encoder/relative_attention_bias",
    ]
    layer = params["decoder"]["layer_0"]
    assert layer["self_attention"]["qkv"]["kernel"].shape == (32, 3, 4, 6)
    assert layer["memory_attention"]["out"]["kernel"].shape == (4, 6, 32)


def test_output_options_final_logits_bias_tied_bias_and_tied_scale():
    ids = jax.random.randint(jax.random.key(5), (2, 5), 1, 32)
    base, params = make(DecoderOnlyLM, share_output_embeddings=True)
    plain = base.apply({"params": params}, ids)
    bias = jax.random.normal(jax.random.key(6), (32,))
    options = dict(share_output_embeddings=True, output_bias=True, final_logits_bias=True)
    model = DecoderOnlyLM(preset("tiny", **options))
    with_bias = {**params, "output_bias": bias, "final_logits_bias": 2 * bias}
    np.testing.assert_allclose(
        model.apply({"params": with_bias}, ids),
        np.asarray(plain) + 3 * np.asarray(bias),
        atol=1e-5,
        rtol=0,
    )
    # final_logits_bias is not trained: its gradient is zero; the tied bias's is not.
    grads = jax.grad(lambda p: model.apply({"params": p}, ids)[..., 3].sum())(with_bias)
    np.testing.assert_array_equal(grads["final_logits_bias"], 0.0)
    assert float(jnp.abs(grads["output_bias"]).sum()) > 0
    scaled = DecoderOnlyLM(preset("tiny", share_output_embeddings=True, tied_output_scale=True))
    np.testing.assert_allclose(
        scaled.apply({"params": params}, ids), plain * 32**-0.5, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "overrides, present",
    [
        (dict(pre_norm=True), True),
        (dict(pre_norm=False), False),
        (dict(pre_norm=True, final_norm=False), False),
        (dict(pre_norm=False, final_norm=True), True),
    ],
)
def test_final_norms_follow_final_norm_or_pre_norm(overrides, present):
    _, params = make(Transformer, **overrides)
    assert ("final_norm" in params["encoder"]) == present
    assert ("final_norm" in params["decoder"]) == present


def test_t5_bias_is_one_table_per_stack_shared_by_its_layers_and_used():
    model, params = make(Transformer, **OPTION_VARIANTS["t5_like"])
    for stack in ("encoder", "decoder"):
        assert params[stack]["relative_attention_bias"].shape == (8, 4)
        assert not [k for k in params[stack]["layer_0"]["self_attention"] if "relative" in k]
    src, tgt = source_batch(), jax.random.randint(jax.random.key(2), (3, 5), 1, 32)
    base = model.apply({"params": params}, src, tgt)
    for stack in ("encoder", "decoder"):
        other = {**params, stack: {**params[stack], "relative_attention_bias": jnp.zeros((8, 4))}}
        assert not np.allclose(model.apply({"params": other}, src, tgt), base, atol=1e-4)


def test_t5_bias_through_the_beam_origin_table_equals_copying_the_rows():
    from jaxformer.decoding.state import reorder, tile_batch
    from jaxformer.models.cache import KVCache

    model, params = make(DecoderOnlyLM, **lm_overrides("t5_like"))
    run = lambda method, *args: model.apply({"params": params}, *args, method=method)
    width, steps = 3, 6
    cache = run(DecoderOnlyLM.init_cache, 2, steps)
    plain = jax.tree.map(
        lambda x: x.replace(indirect=False) if isinstance(x, KVCache) else x,
        cache,
        is_leaf=lambda x: isinstance(x, KVCache),
    )
    ids = jax.random.randint(jax.random.key(3), (2 * width, steps), 3, 32)
    beams = np.random.default_rng(0).integers(0, width, (steps, 2 * width))
    reorders = jnp.asarray(np.arange(2 * width) // width * width + beams, jnp.int32)
    results = []
    for start in (tile_batch(cache, width), tile_batch(plain, width)):
        state, logits = start, []
        for t in range(steps):
            out, state, _ = run(DecoderOnlyLM.decode_step, ids[:, t], jnp.int32(t), state)
            logits.append(out)
            state = reorder(state, reorders[t])
        results.append(np.stack(logits))
    np.testing.assert_allclose(results[0], results[1], atol=2e-5, rtol=0)


# --- Defaults, old configs, export ---------------------------------------------------------------


def test_default_options_keep_todays_parameter_tree():
    _, params = make(Transformer)
    assert set(params) == {"target_embedding", "source_embedding", "encoder", "decoder", "output"}
    layer = params["decoder"]["layer_0"]
    assert set(layer["ffn"]) == {"inner", "outer"}
    assert set(layer["norm_self"]) == {"scale", "bias"}
    assert set(layer["self_attention"]["qkv"]) == {"kernel", "bias"}


NEW_FIELDS = [f.name for f in dataclasses.fields(TransformerConfig)][
    [f.name for f in dataclasses.fields(TransformerConfig)].index("dtype") + 1 :
]


def test_a_run_config_written_before_the_options_loads_with_the_defaults():
    data = to_dict(ExperimentConfig())
    for name in NEW_FIELDS:
        del data["model"][name]
    assert from_dict(data) == ExperimentConfig()


EXPORT_REFUSALS = [
    ("layer_norm_epsilon", 1e-3),
    ("norm", "rms"),
    ("final_norm", False),
    ("activation", "gelu"),
    ("positions", "learned"),
    ("position_layout", "concat"),
    ("position_rate_denominator", "D/2-1"),
    ("position_offset", 1),
    ("embedding_scale", 1.0),
    ("embedding_norm", True),
    ("final_logits_bias", True),
    ("output_bias", False),
    ("attention_head_dim", 4),
    ("query_scaling", False),
    ("attention_bias", False),
    ("ffn_bias", False),
    ("tied_output_scale", True),
    ("relative_attention_num_buckets", 32),
    ("num_kv_heads", 2),
    ("sliding_window", 4),
    ("attention_out_bias", False),
]


def test_every_new_field_is_covered_by_the_export_refusals():
    # Not refused: the bucket distance comes with the buckets, the rotary settings with
    # positions="rotary" (refused as positions); quantization is how jaxformer runs the same
    # float32 weights (the export writes them; CTranslate2 has its own quantization).
    exempt = {"relative_attention_max_distance", "quantization", "rope_theta", "rope_scaling"}
    assert {name for name, _ in EXPORT_REFUSALS} | exempt == set(NEW_FIELDS)


@pytest.mark.parametrize("field, value", EXPORT_REFUSALS, ids=[f for f, _ in EXPORT_REFUSALS])
def test_the_ctranslate2_export_refuses_options_it_cannot_write(field, value):
    tied = dict(share_output_embeddings=True) if field == "tied_output_scale" else {}
    config = preset("tiny", **{field: value}, **tied)
    vocab = ids_vocab(32)
    with pytest.raises(ValueError, match=rf"model_config\.{field}=.*CTranslate2 export"):
        _check_model(config, {}, vocab, vocab)
    # Explicit values equal to today's resolution are accepted.
    _check_model(preset("tiny", positions="sinusoidal", output_bias=True), _PARTS, vocab, vocab)


_PARTS = {"encoder": {}, "decoder": {}, "target_embedding": {}}
