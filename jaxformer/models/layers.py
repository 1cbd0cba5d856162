"""Small building blocks: feed-forward, norms, token embeddings with positions, learned positions."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.models.activations import resolve_activation
from jaxformer.models.norms import DEFAULT_EPSILON, make_norm
from jaxformer.models.positions import sinusoidal_table
from jaxformer.models.quantization import check_quantization, dense_options, int8_dot_general
from jaxformer.typing import Array, Float, Int


def layer_norm(
    name: str | None = None,
    dtype=jnp.float32,
    kind: str = "layer",
    epsilon: float = DEFAULT_EPSILON,
) -> nn.Module:
    """A norm of ``kind`` ("layer" or "rms", see ``norms.py``); epsilon 1e-6 unless given
    (OpenNMT-tf's is 1e-3: ``TransformerConfig.layer_norm_epsilon``)."""
    return make_norm(kind, epsilon, name, dtype)


def config_norm(config, name: str) -> nn.Module:
    """The norm a ``TransformerConfig`` asks for (kind, epsilon, dtype)."""
    return make_norm(config.norm, config.layer_norm_epsilon, name, jnp.dtype(config.dtype))


class FeedForward(nn.Module):
    """Position-wise ``dense(F) -> activation -> dropout -> dense(D)``.

    A gated activation (``gated-*``, ``geglu``, ``swiglu``) has a second inner projection
    ``inner_linear`` (T5 v1.1's ``wi_1``; ``inner`` is ``wi_0``): ``act(inner(x)) * inner_linear(x)``.
    """

    d_model: int
    ffn_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    activation: str = "relu"
    use_bias: bool = True
    quantization: str | None = None  # "int8": see quantization.py

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"], deterministic: bool = True):
        act, gated = resolve_activation(self.activation)  # resolved while tracing, not per step
        options = dense_options(self.quantization)
        dense = lambda features, name: nn.Dense(
            features, use_bias=self.use_bias, dtype=self.dtype, name=name, **options
        )
        h = act(dense(self.ffn_dim, "inner")(x))  # [B, T, F]
        if gated:
            h = h * dense(self.ffn_dim, "inner_linear")(x)  # [B, T, F]
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(self.d_model, "outer")(h)  # [B, T, D]


class TokenEmbedding(nn.Module):
    """Token embedding scaled by ``scale`` (None: sqrt(D)), plus sinusoidal positions when
    ``sinusoidal`` (their layout, rates and offset as in ``positions.py``).

    ``attend`` turns hidden states into logits with the same table (tied output embeddings).
    """

    vocab_size: int
    d_model: int
    max_len: int
    sinusoidal: bool = True
    dtype: Any = jnp.float32
    scale: float | None = None
    position_layout: str = "interleaved"
    position_rate_denominator: str = "D/2"
    position_offset: int = 0
    quantization: str | None = None  # of ``attend``: "int8", see quantization.py

    def setup(self):
        check_quantization(self.quantization)
        self.table = self.param(
            "embedding",
            nn.initializers.normal(stddev=self.d_model**-0.5),
            (self.vocab_size, self.d_model),
        )
        if self.sinusoidal:
            table = sinusoidal_table(
                self.max_len + self.position_offset,
                self.d_model,
                self.position_layout,
                self.position_rate_denominator,
            )
            self.positions = jnp.asarray(table[self.position_offset :])  # row t: token t

    def __call__(
        self, ids: Int[Array, "B T"], positions: Int[Array, " T"] | Int[Array, "B T"]
    ) -> Float[Array, "B T D"]:
        """``positions``: ``[T]`` shared by every row, or ``[B, T]`` (each row at its own)."""
        x = jnp.take(self.table, ids, axis=0)  # [B, T, D]
        if self.scale is None:
            x = x * jnp.sqrt(jnp.float32(self.d_model))
        elif self.scale != 1.0:
            x = x * jnp.float32(self.scale)
        if self.sinusoidal:
            table = jnp.take(self.positions, positions, axis=0)  # [T, D] or [B, T, D]
            x = x + (table[None] if positions.ndim == 1 else table)
        return x.astype(self.dtype)

    def attend(self, x: Float[Array, "... D"]) -> Float[Array, "... V"]:
        table = self.table.astype(self.dtype)  # [V, D]
        if self.quantization == "int8":
            return int8_dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())))
        return jnp.einsum("...D,VD->...V", x, table)


class LearnedPositions(nn.Module):
    """A learned table of absolute positions; token t reads row ``t + offset`` (BART: offset 2).

    The table has ``max_len + offset`` rows (Hugging Face's ``max_position_embeddings + offset``).
    """

    max_len: int
    d_model: int
    offset: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, positions: Int[Array, " T"] | Int[Array, "B T"]
    ) -> Float[Array, "T D"] | Float[Array, "B T D"]:
        table = self.param(
            "embedding",
            nn.initializers.normal(stddev=self.d_model**-0.5),
            (self.max_len + self.offset, self.d_model),
        )
        return jnp.take(table, positions + self.offset, axis=0).astype(self.dtype)
