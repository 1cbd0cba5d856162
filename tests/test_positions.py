import math

import jax.numpy as jnp
import numpy as np

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
