"""Position information: sinusoidal encodings and relative position indices.

Sinusoidal encodings follow Vaswani et al. (2017), section 3.5, with interleaved channels:

    PE[p, 2i]   = sin(p / 10000^(2i / D))
    PE[p, 2i+1] = cos(p / 10000^(2i / D))

for positions p = 0, 1, ...

Relative positions follow Shaw et al. (2018) as OpenNMT-tf implements them: the distance ``j - i`` from
query position i to key position j is clipped to ``[-max, max]`` and shifted by ``max`` to index a learned
table of ``2 * max + 1`` rows (one for keys, one for values), shared by all heads.
"""

import jax.numpy as jnp
import numpy as np

from jaxformer.typing import Array, Float, Int


def sinusoidal_table(length: int, depth: int) -> Float[np.ndarray, "T D"]:
    """The ``[length, depth]`` table of sinusoidal encodings, as a NumPy constant (built once)."""
    if depth % 2:
        raise ValueError(f"sinusoidal encodings need an even depth, got {depth}")
    positions = np.arange(length, dtype=np.float64)[:, None]  # [T, 1]
    rates = 1.0 / np.power(10000.0, np.arange(0, depth, 2, dtype=np.float64) / depth)  # [D/2]
    angles = positions * rates[None, :]  # [T, D/2]
    table = np.empty((length, depth), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table.astype(np.float32)


def relative_positions(
    query_positions: Int[Array, " T"], key_positions: Int[Array, " S"], maximum: int
) -> Int[Array, "T S"]:
    """Indices into a relative table: ``clip(key - query, -maximum, maximum) + maximum``.

    For 4 positions and ``maximum=2``::

        [[2, 3, 4, 4],
         [1, 2, 3, 4],
         [0, 1, 2, 3],
         [0, 0, 1, 2]]

    A cached decode step passes its single absolute query position and the positions of every cache
    slot, so the distances are those a full pass would use.
    """
    distance = key_positions[None, :] - query_positions[:, None]  # [T, S]
    return jnp.clip(distance, -maximum, maximum) + maximum
