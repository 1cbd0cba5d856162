"""int8 products (``models/quantization.py``): the arithmetic, its axes, and a model built with it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import DecoderOnlyLM, Transformer, TransformerConfig, generate
from jaxformer.models import quantization as quant

DENSE = (((2,), (0,)), ((), ()))  # [B, T, D] x [D, F]


def on_grid(rng, shape, axes):
    """Values exactly representable as int8 times a power-of-two scale per slice over ``axes``:
    each slice's absolute maximum is 127 * scale, so quantizing it loses nothing."""
    q = rng.integers(-127, 128, size=shape).astype(np.float32)
    first = tuple(0 if d in axes else slice(None) for d in range(len(shape)))
    q[first] = 127.0  # every slice reaches the maximum: its scale is exactly 2**e
    scale = 2.0 ** rng.integers(-6, 3, size=[1 if d in axes else n for d, n in enumerate(shape)])
    return (q * scale).astype(np.float32)


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, numbers",
    [
        ((2, 8, 16), (16, 24), DENSE),  # feed-forward, output layer
        ((4, 5, 16), (16, 3, 2, 8), (((2,), (0,)), ((), ()))),  # fused QKV ([D, 3, N, H])
        ((2, 8, 2, 8), (2, 8, 16), (((2, 3), (0, 1)), ((), ()))),  # attention output ([N, H, D])
        ((2, 8, 16), (24, 16), (((2,), (1,)), ((), ()))),  # tied output (the embedding [V, D])
    ],
    ids=["dense", "qkv", "out", "tied"],
)
def test_int8_is_exact_on_int8_grid_values_so_the_scales_sit_on_the_right_axes(
    lhs_shape, rhs_shape, numbers
):
    """Rows (lhs) and output channels (rhs) with their own power-of-two scales: int8 loses nothing,
    so the product equals float32's up to float32 rounding. A scale on a wrong axis breaks it."""
    rng = np.random.default_rng(0)
    (lhs_contract, rhs_contract), _ = numbers
    lhs = on_grid(rng, lhs_shape, lhs_contract)
    rhs = on_grid(rng, rhs_shape, rhs_contract)
    want = jax.lax.dot_general(lhs, rhs, numbers, precision="highest")
    got = quant.int8_dot_general(jnp.asarray(lhs), jnp.asarray(rhs), numbers)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


def test_int8_error_on_gaussian_values_is_that_of_8_bits():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16, 256)).astype(np.float32)
    w = (rng.standard_normal((256, 64)) / 16).astype(np.float32)
    want = np.asarray(jax.lax.dot_general(x, w, DENSE, precision="highest"))
    got = np.asarray(quant.int8_dot_general(jnp.asarray(x), jnp.asarray(w), DENSE))
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-4 < relative < 2e-2  # quantized (not float32 by mistake), and only by 8-bit steps


def test_fewer_rows_than_the_threshold_stay_float32_and_zero_rows_give_zeros():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    small = jnp.asarray(rng.standard_normal((1, quant.MIN_ROWS - 1, 16)), jnp.float32)
    np.testing.assert_array_equal(
        quant.int8_dot_general(small, w, DENSE), jax.lax.dot_general(small, w, DENSE)
    )
    zeros = jnp.zeros((1, quant.MIN_ROWS, 16), jnp.float32)
    out = quant.int8_dot_general(zeros, w, DENSE)
    np.testing.assert_array_equal(out, jnp.zeros((1, quant.MIN_ROWS, 8)))  # not NaN (scale 0)


def test_the_int8_product_is_int8_by_int8_in_the_compiled_program():
    x = jnp.ones((2, 8, 16), jnp.float32)
    w = jnp.ones((16, 24), jnp.float32)
    hlo = jax.jit(quant.int8_dot_general, static_argnums=2).lower(x, w, DENSE).as_text()
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all("xi8>" in line and "-> tensor<2x8x24xi32>" in line for line in dots), dots


def test_quantization_is_checked_by_name():
    with pytest.raises(
        ValueError, match=r"quantization must be one of \[None, 'int8'\], got 'int4'"
    ):
        TransformerConfig(quantization="int4")
    with pytest.raises(ValueError, match="quantization must be one of"):
        quant.dense_options("fp8")
    with pytest.raises(ValueError, match="batch dimensions are not supported"):
        x = jnp.ones((2, 16, 4))
        quant.int8_dot_general(x, x, (((2,), (2,)), ((0,), (0,))))


@pytest.mark.parametrize("tied", [False, True])
def test_an_int8_model_has_the_float32_parameters_and_close_logits(key, tied):
    config = TransformerConfig(
        vocab_size=40, d_model=32, ffn_dim=64, dropout=0.0, share_output_embeddings=tied
    )
    src = jax.random.randint(key, (4, 9), 3, 40)
    tgt = jax.random.randint(jax.random.fold_in(key, 1), (4, 7), 3, 40)
    model = Transformer(config)
    params = model.init(key, src, tgt)["params"]
    int8 = Transformer(dataclasses.replace(config, quantization="int8"))
    assert jax.tree.structure(int8.init(key, src, tgt)["params"]) == jax.tree.structure(params)
    want = np.asarray(model.apply({"params": params}, src, tgt))  # [B, T, V]
    got = np.asarray(int8.apply({"params": params}, src, tgt))
    assert not np.array_equal(got, want)  # the int8 path ran
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_an_int8_language_model_has_close_logits(key):
    config = TransformerConfig(vocab_size=40, d_model=32, ffn_dim=64, dropout=0.0)
    ids = jax.random.randint(key, (4, 9), 3, 40)
    model = DecoderOnlyLM(config)
    params = model.init(key, ids)["params"]
    want = np.asarray(model.apply({"params": params}, ids))  # [B, T, V]
    got = np.asarray(
        DecoderOnlyLM(dataclasses.replace(config, quantization="int8")).apply(
            {"params": params}, ids
        )
    )
    assert not np.array_equal(got, want)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def tiny_translation(key):
    config = TransformerConfig(vocab_size=40, d_model=32, ffn_dim=64, dropout=0.0)
    src = jax.random.randint(key, (8, 9), 3, 40)
    tgt = jax.random.randint(jax.random.fold_in(key, 1), (8, 7), 3, 40)
    params = Transformer(config).init(key, src, tgt)["params"]
    return config, params, src, tgt


def test_quantize_params_gives_int8_kernels_with_scales_and_the_same_products(key):
    config, params, src, tgt = tiny_translation(key)
    int8 = Transformer(dataclasses.replace(config, quantization="int8"))
    quantized = quant.quantize_params(params)
    qkv = quantized["decoder"]["layer_0"]["self_attention"]["qkv"]
    out = quantized["decoder"]["layer_0"]["self_attention"]["out"]
    assert qkv["kernel"].dtype == jnp.int8 and qkv["int8"]["scale"].shape == (1, 3, 4, 8)
    assert out["kernel"].shape == (4, 8, 32) and out["int8"]["scale"].shape == (1, 1, 32)
    assert quantized["decoder"]["layer_0"]["ffn"]["outer"]["kernel"].dtype == jnp.int8
    assert quantized["output"]["kernel"].dtype == jnp.int8
    assert quantized["target_embedding"] == params["target_embedding"]  # not a projection
    assert qkv["bias"] is params["decoder"]["layer_0"]["self_attention"]["qkv"]["bias"]
    # The same int8 arithmetic as quantizing inside each product: equal logits.
    on_the_fly = np.asarray(int8.apply({"params": params}, src, tgt))  # [B, T, V], 56 rows
    stored = np.asarray(int8.apply({"params": quantized}, src, tgt))
    np.testing.assert_allclose(stored, on_the_fly, rtol=1e-5, atol=1e-5)
    # Under 16 rows the kernel is dequantized: close to float32.
    one = Transformer(config).apply({"params": params}, src[:1], tgt[:1])
    np.testing.assert_allclose(
        int8.apply({"params": quantized}, src[:1], tgt[:1]), one, atol=0.05 * np.abs(one).max()
    )


def test_int8_parameters_decode_as_quantizing_on_the_fly(key):
    config, params, src, _ = tiny_translation(key)
    model = Transformer(dataclasses.replace(config, quantization="int8"))
    src = jnp.tile(src, (2, 1))  # 16 rows: int8 products in every decode step
    run = lambda p: generate(model, p, src, start_id=1, end_id=2, max_length=6)
    np.testing.assert_array_equal(run(quant.quantize_params(params)).ids, run(params).ids)


def test_int8_parameters_are_refused_where_they_would_compute_wrong(key):
    config, params, src, tgt = tiny_translation(key)
    quantized = quant.quantize_params(params)
    with pytest.raises(
        ValueError, match=r"hold int8 kernels .*TransformerConfig\(quantization='int8'\)"
    ):
        Transformer(config).apply({"params": quantized}, src, tgt)  # a float32 model
    int8 = Transformer(dataclasses.replace(config, quantization="int8"))
    lost = jax.tree.map(lambda x: x, quantized)
    del lost["output"]["int8"]
    with pytest.raises(ValueError, match=r"output/int8: an int8 kernel without its scale"):
        int8.apply({"params": lost}, src, tgt)
    wrong = jax.tree.map(lambda x: x, quantized)
    wrong["output"]["int8"]["scale"] = wrong["output"]["int8"]["scale"].T
    with pytest.raises(ValueError, match=r"has a scale of shape \(40, 1\), expected \(1, 40\)"):
        int8.apply({"params": wrong}, src, tgt)
