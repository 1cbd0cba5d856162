"""Small building blocks: feed-forward, layer norm, token embeddings with positions."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.models.positions import sinusoidal_table
from jaxformer.typing import Array, Float, Int


def layer_norm(name: str | None = None, dtype=jnp.float32) -> nn.LayerNorm:
    """Layer norm with OpenNMT-tf's epsilon (1e-6)."""
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


class FeedForward(nn.Module):
    """Position-wise ``dense(F) -> ReLU -> dropout -> dense(D)``."""

    d_model: int
    ffn_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"], deterministic: bool = True):
        h = nn.relu(nn.Dense(self.ffn_dim, dtype=self.dtype, name="inner")(x))  # [B, T, F]
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(self.d_model, dtype=self.dtype, name="outer")(h)  # [B, T, D]


class TokenEmbedding(nn.Module):
    """Token embedding scaled by sqrt(D), plus sinusoidal positions unless positions are relative.

    ``attend`` turns hidden states into logits with the same table (tied output embeddings).
    """

    vocab_size: int
    d_model: int
    max_len: int
    sinusoidal: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.table = self.param(
            "embedding",
            nn.initializers.normal(stddev=self.d_model**-0.5),
            (self.vocab_size, self.d_model),
        )
        if self.sinusoidal:
            self.positions = jnp.asarray(sinusoidal_table(self.max_len, self.d_model))

    def __call__(
        self, ids: Int[Array, "B T"], positions: Int[Array, " T"] | Int[Array, "B T"]
    ) -> Float[Array, "B T D"]:
        """``positions``: ``[T]`` shared by every row, or ``[B, T]`` (each row at its own)."""
        x = jnp.take(self.table, ids, axis=0) * jnp.sqrt(jnp.float32(self.d_model))  # [B, T, D]
        if self.sinusoidal:
            table = jnp.take(self.positions, positions, axis=0)  # [T, D] or [B, T, D]
            x = x + (table[None] if positions.ndim == 1 else table)
        return x.astype(self.dtype)

    def attend(self, x: Float[Array, "... D"]) -> Float[Array, "... V"]:
        return jnp.einsum("...D,VD->...V", x, self.table.astype(self.dtype))
