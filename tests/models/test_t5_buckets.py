"""T5's relative position buckets against a loop transcription of Mesh TensorFlow's function."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.models.dot_product import (
    attend_heads_major,
    attend_through_origin,
    dot_product_attention,
)
from jaxformer.models.t5_buckets import relative_bias, relative_position_bucket


def mesh_tf_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """One offset at a time, as Mesh TensorFlow's ``_relative_position_bucket`` (float32 log)."""
    ret, n = 0, -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    log = np.log(np.float32(n) / np.float32(max_exact))
    large = max_exact + int(
        log / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    )
    return ret + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 16)])
def test_buckets_match_the_mesh_tensorflow_formula(bidirectional, num_buckets, max_distance):
    offsets = np.arange(-300, 301)
    got = np.asarray(
        relative_position_bucket(jnp.asarray(offsets), bidirectional, num_buckets, max_distance)
    )
    expected = [mesh_tf_bucket(int(d), bidirectional, num_buckets, max_distance) for d in offsets]
    np.testing.assert_array_equal(got, expected)
    assert got.min() >= 0 and got.max() == num_buckets - 1


def test_known_buckets_of_t5_defaults():
    offsets = jnp.asarray([0, -1, -7, -8, -128, -1000, 1, 7, 1000])
    # Bidirectional: keys before the query in 0..15, after it in 16..31; 0..7 exact.
    np.testing.assert_array_equal(
        relative_position_bucket(offsets, True, 32, 128), [0, 1, 7, 8, 15, 15, 17, 23, 31]
    )
    # Causal: future keys all in bucket 0 (they are masked anyway).
    np.testing.assert_array_equal(
        relative_position_bucket(offsets, False, 32, 128), [0, 1, 7, 8, 31, 31, 0, 0, 0]
    )


def test_a_cached_row_is_a_row_of_the_full_bias():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(32, 3)), jnp.float32)
    pos = jnp.arange(9)
    full = relative_bias(table, pos, pos, False, 128)  # [N, T, S]
    rows = relative_bias(table, jnp.asarray([2, 5, 8]), pos, False, 128, per_row=True)
    assert full.shape == (3, 9, 9) and rows.shape == (3, 3, 1, 9)
    for r, t in enumerate((2, 5, 8)):
        np.testing.assert_array_equal(rows[r, :, 0], full[:, t])


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_an_additive_bias_shifts_the_scores_of_each_head():
    q, k, v = _random((2, 3, 2, 4), 0), _random((2, 5, 2, 4), 1), _random((2, 5, 2, 4), 2)
    bias = _random((1, 2, 3, 5), 3)  # [1, N, T, S]
    out, probs = dot_product_attention(q, k, v, None, bias=bias)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / 2.0 + np.asarray(bias)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_allclose(out, np.einsum("bnts,bsnh->btnh", expected, v), atol=1e-5)


def test_a_per_row_bias_through_the_origin_table_equals_the_copied_rows():
    batch, width, heads, length, head_dim = 2, 3, 2, 6, 4
    rows = batch * width
    q = _random((rows, 1, heads, head_dim), 0)
    k, v = (
        _random((batch, heads, width, length, head_dim), 1),
        _random((batch, heads, width, length, head_dim), 2),
    )
    origin = jnp.asarray(np.random.default_rng(3).integers(0, width, (rows, length)), jnp.int32)
    mask = jnp.arange(length)[None, :] <= jnp.asarray([5, 3, 4, 5, 2, 0])[:, None]  # [R, S]
    bias = _random((rows, heads, 1, length), 4)
    got = attend_through_origin(q, k, v, origin, mask, None, None, bias)
    entry = (jnp.arange(rows) // width)[:, None]  # [R, 1]
    slots = jnp.arange(length)[None, :]
    copied = lambda x: jnp.swapaxes(x[entry, :, origin, slots], 1, 2)  # --> [R, N, S, H]
    expected, _ = attend_heads_major(q, copied(k), copied(v), mask[:, None, None, :], bias=bias)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
