"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer") as Llama, Mistral, Qwen2, Gemma use them.

Nothing is added to the token embeddings. In every self-attention the queries and keys of position p
are rotated, pair of channels by pair of channels, by the angles ``p * inv_freq[i]``; a score
``q_i . k_j`` then depends on the positions only through ``i - j``. The inverse frequencies are
``inv_freq[i] = theta ** (-2i / H)`` for ``i < H/2`` (``TransformerConfig.rope_theta``: 10000 in the
paper and Llama 2, 500000 in Llama 3).

Layout: Hugging Face's "rotate_half". Channel i of a head is paired with channel ``i + H/2`` (not with
its neighbour ``i + 1`` as in the paper and Meta's reference code): with ``x = [x1 | x2]``,

    rope(x, p) = x * cos(p * f) + [-x2 | x1] * sin(p * f),     f = [inv_freq | inv_freq]

Hugging Face's converters permute the q/k projection weights of Meta's checkpoints into this layout,
so weights read from a ``model.safetensors`` are already in it.

Scalings of ``inv_freq`` for longer contexts (``TransformerConfig.rope_scaling``, a ``RopeScaling``),
as transformers' ``modeling_rope_utils`` computes them:

- ``"linear"`` (position interpolation, Chen et al. 2023): every inverse frequency divided by
  ``factor`` (the same as dividing the positions by it).
- ``"llama3"`` (Llama 3.1 and 3.2): with ``L = original_max_position_embeddings`` and wavelengths
  ``w = 2 pi / inv_freq``, frequencies whose wavelength is shorter than ``L / high_freq_factor`` are
  kept; those longer than ``L / low_freq_factor`` are divided by ``factor``; in between (both bounds
  included) they are blended, ``(1 - s) * inv_freq / factor + s * inv_freq`` with
  ``s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.

Precision: the inverse frequencies are computed in float64 with NumPy when a model is traced (a
constant of the compiled program) and rounded to float32; the angles ``p * inv_freq`` are formed in
float32, cos/sin taken in float32 and cast to the activations' dtype, as transformers does.
transformers computes ``inv_freq`` itself in float32, so its values may differ from these correctly
rounded ones by an ulp (6e-8 relative): the order of its own float32 rounding of the angles, far
below a 1e-4 logit tolerance at the lengths of an import check (an angle error of ``p * 6e-8`` rad).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxformer.typing import Array, Float, Int

ROPE_SCALINGS: tuple[str, ...] = ("linear", "llama3")
_LLAMA3_FIELDS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A scaling of the rotary inverse frequencies (frozen and hashable: the config is a static jit
    argument). Field names are those of Hugging Face's ``rope_scaling``; see the module docstring.

    ``RopeScaling("linear", factor=4.0)``;
    ``RopeScaling("llama3", 32.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192)`` (Llama 3.2).
    """

    rope_type: str  # one of ROPE_SCALINGS
    factor: float
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(f"rope_scaling: {problem}")

    def problem(self) -> str | None:
        """What is wrong with these values (naming the field), or None."""
        if self.rope_type not in ROPE_SCALINGS:
            return f"rope_type must be one of {list(ROPE_SCALINGS)}, got {self.rope_type!r}"
        if not (_number(self.factor) and self.factor > 0):
            return f"factor must be a number > 0, got {self.factor!r}"
        if self.rope_type == "linear":
            extra = [name for name in _LLAMA3_FIELDS if getattr(self, name) is not None]
            return f"{extra[0]} is for rope_type 'llama3' only" if extra else None
        low, high = self.low_freq_factor, self.high_freq_factor
        original = self.original_max_position_embeddings
        if not (_number(low) and low > 0):
            return f"low_freq_factor must be a number > 0 for 'llama3', got {low!r}"
        if not (_number(high) and high > low):
            return f"high_freq_factor must be a number > low_freq_factor ({low}), got {high!r}"
        if not (isinstance(original, int) and not isinstance(original, bool) and original >= 1):
            return f"original_max_position_embeddings must be an int >= 1, got {original!r}"
        return None

    @classmethod
    def of(cls, value) -> RopeScaling | None:
        """None, a ``RopeScaling``, or a mapping with its field names (Hugging Face's
        ``rope_scaling`` dict; its older key ``type`` is read as ``rope_type``). Unknown keys are
        refused by name."""
        if value is None or isinstance(value, RopeScaling):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"rope_scaling must be None, a RopeScaling or a mapping, got {type(value).__name__}"
            )
        fields = dict(value)
        if "type" in fields and "rope_type" not in fields:
            fields["rope_type"] = fields.pop("type")
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"rope_scaling has unknown keys {unknown}")
        if "rope_type" not in fields or "factor" not in fields:
            raise ValueError(f"rope_scaling needs rope_type and factor, got {sorted(fields)}")
        return cls(**fields)

    def apply(self, inv_freq: Float[np.ndarray, " half"]) -> Float[np.ndarray, " half"]:
        """The scaled inverse frequencies (float64 in, float64 out)."""
        if self.rope_type == "linear":
            return inv_freq / self.factor
        context = float(self.original_max_position_embeddings)
        low, high = float(self.low_freq_factor), float(self.high_freq_factor)
        wavelength = 2.0 * math.pi / inv_freq
        longest_kept, shortest_scaled = context / high, context / low
        divided = inv_freq / self.factor
        # The blend's weight of the kept frequency: 0 at shortest_scaled, 1 at longest_kept.
        weight = (context / wavelength - low) / (high - low)
        blended = (1.0 - weight) * divided + weight * inv_freq
        between = (wavelength >= longest_kept) & (wavelength <= shortest_scaled)
        return np.where(wavelength > shortest_scaled, divided, np.where(between, blended, inv_freq))


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> Float[np.ndarray, " half"]:
    """``theta ** (-2i / H)`` for ``i < H/2``, scaled, as a float32 NumPy constant."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / np.power(float(theta), exponents)
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    return inv_freq.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Rotary:
    """The rotation of one model's self-attention heads (a hashable module field)."""

    head_dim: int  # H, even
    theta: float = 10000.0
    scaling: RopeScaling | None = None

    def __call__(
        self, x: Float[Array, "B T N H"], positions: Int[Array, " T"] | Int[Array, "B T"]
    ) -> Float[Array, "B T N H"]:
        """``x`` rotated at ``positions``: ``[T]`` shared by every row, or ``[B, T]`` per row."""
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        inv_freq = jnp.asarray(inv_freq.reshape((1,) * positions.ndim + (-1,)))  # [1, (1,) H/2]
        angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [T, H/2] or [B, T, H/2]
        angles = jnp.concatenate([angles, angles], axis=-1)  # [.., H]: pairs (i, i + H/2)
        angles = jnp.reshape(angles, (-1, *angles.shape[-2:]))[:, :, None, :]  # [1 or B, T, 1, H]
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
        first, second = jnp.split(x, 2, axis=-1)
        rotated = jnp.concatenate([-second, first], axis=-1)  # [-x2 | x1]
        return x * cos + rotated * sin
