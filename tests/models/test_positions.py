import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.models.positions import relative_positions, sinusoidal_table


def test_sinusoidal_table_matches_closed_form():
    length, depth = 50, 16
    table = sinusoidal_table(length, depth)
    assert table.shape == (length, depth) and table.dtype == np.float32
    for pos in range(length):
        for i in range(depth // 2):
            angle = pos / 10000 ** (2 * i / depth)
            assert math.isclose(table[pos, 2 * i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[pos, 2 * i + 1], math.cos(angle), abs_tol=1e-6)


def test_relative_index_matrix_of_the_issue():
    pos = jnp.arange(4)
    expected = [[2, 3, 4, 4], [1, 2, 3, 4], [0, 1, 2, 3], [0, 0, 1, 2]]
    np.testing.assert_array_equal(relative_positions(pos, pos, 2), expected)


def test_relative_index_of_a_cached_step_is_a_row_of_the_full_matrix():
    pos = jnp.arange(7)
    full = relative_positions(pos, pos, 3)
    for step in range(7):
        one = relative_positions(jnp.array([step]), pos, 3)
        np.testing.assert_array_equal(one[0], full[step])


def test_concatenated_table_with_half_minus_one_rates_matches_closed_form():
    # tensor2tensor / OpenNMT-tf / Fairseq: [sin | cos], rates 10000^(-i / (D/2 - 1)).
    length, depth = 20, 8
    table = sinusoidal_table(length, depth, layout="concat", rate_denominator="D/2-1")
    half = depth // 2
    for pos in range(length):
        for i in range(half):
            angle = pos * 10000 ** (-i / (half - 1))
            assert math.isclose(table[pos, i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[pos, half + i], math.cos(angle), abs_tol=1e-6)
    assert math.isclose(table[1, half - 1], math.sin(1e-4), rel_tol=1e-6)  # last rate: 1/10000


def test_concatenated_table_with_half_rates_is_the_interleaved_one_reordered():
    interleaved = sinusoidal_table(30, 12)
    concat = sinusoidal_table(30, 12, layout="concat")
    np.testing.assert_array_equal(
        concat, np.concatenate([interleaved[:, 0::2], interleaved[:, 1::2]], 1)
    )


def test_unknown_layout_or_rates_are_refused():
    for kwargs, message in (
        (dict(layout="split"), r"layout must be one of \['interleaved', 'concat'\]"),
        (dict(rate_denominator="D"), r"rate_denominator must be one of \['D/2', 'D/2-1'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            sinusoidal_table(4, 8, **kwargs)
