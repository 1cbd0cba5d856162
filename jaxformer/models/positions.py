"""Position information: sinusoidal encodings, learned absolute positions, relative position indices.

Sinusoidal encodings follow Vaswani et al. (2017), section 3.5. jaxformer's default interleaves the
channels and starts at position 0:

    PE[p, 2i]   = sin(p * r_i)
    PE[p, 2i+1] = cos(p * r_i),      r_i = 10000^(-i / (D/2))  (= 10000^(-2i/D); "D/2")

Other implementations (tensor2tensor's ``get_timing_signal_1d``, which OpenNMT-tf and Fairseq follow)
concatenate the halves and spread the rates over ``D/2 - 1`` steps so that the last rate is exactly
1/10000:

    PE[p] = [sin(p * r_0) .. sin(p * r_{D/2-1}) | cos(p * r_0) .. cos(p * r_{D/2-1})],
    r_i = 10000^(-i / (D/2 - 1))  ("D/2-1")

and the first token is not at position 0: OpenNMT-tf starts at 1 (``tf.range(T) + 1``, ``step + 1`` in
a cached step), Fairseq / M2M100 / NLLB at ``padding_idx + 1`` (2). Marian (Hugging Face) concatenates
with the "D/2" rates from position 0. A position offset k makes token t read row ``t + k`` of a table
covering ``max_len + k`` positions; learned tables (BART: k = 2) use the same offset.

Relative positions follow Shaw et al. (2018) as OpenNMT-tf implements them: the distance ``j - i`` from
query position i to key position j is clipped to ``[-max, max]`` and shifted by ``max`` to index a learned
table of ``2 * max + 1`` rows (one for keys, one for values), shared by all heads.

Rotary position embeddings (``positions="rotary"``: Su et al. 2021; Llama, Mistral, Qwen2, Gemma) add
nothing to the embeddings: every self-attention rotates its queries and keys by their positions
(``rotary.py``).
"""

import jax.numpy as jnp
import numpy as np

from jaxformer.typing import Array, Float, Int

POSITIONS: tuple[str, ...] = ("sinusoidal", "learned", "none", "rotary")
LAYOUTS: tuple[str, ...] = ("interleaved", "concat")
RATE_DENOMINATORS: tuple[str, ...] = ("D/2", "D/2-1")


def sinusoidal_rates(depth: int, rate_denominator: str = "D/2") -> Float[np.ndarray, " half"]:
    """The ``D/2`` angular rates ``10000^(-i / denominator)`` in float64."""
    half = depth // 2
    if rate_denominator == "D/2":
        # Written as today's 1 / 10000^(2i/D): the default table stays bit for bit what it was.
        return 1.0 / np.power(10000.0, np.arange(0, depth, 2, dtype=np.float64) / depth)
    if rate_denominator == "D/2-1":
        if half < 2:
            raise ValueError(f"rate denominator 'D/2-1' needs a depth >= 4, got {depth}")
        return np.exp(np.arange(half, dtype=np.float64) * -(np.log(10000.0) / (half - 1)))
    raise ValueError(
        f"rate_denominator must be one of {list(RATE_DENOMINATORS)}, got {rate_denominator!r}"
    )


def sinusoidal_table(
    length: int, depth: int, layout: str = "interleaved", rate_denominator: str = "D/2"
) -> Float[np.ndarray, "T D"]:
    """The ``[length, depth]`` table of sinusoidal encodings of positions ``0 .. length-1``, as a
    NumPy constant (built once). Row p encodes position p: an offset is applied by the caller."""
    if depth % 2:
        raise ValueError(f"sinusoidal encodings need an even depth, got {depth}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    positions = np.arange(length, dtype=np.float64)[:, None]  # [T, 1]
    angles = positions * sinusoidal_rates(depth, rate_denominator)[None, :]  # [T, D/2]
    if layout == "concat":
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)
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
