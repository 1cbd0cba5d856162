"""The Hourglass LM (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language Models").

Architecture, one level at a time (``hourglass(x)`` at a level with relative factor K)::

    h = pre_layers(x)                            # [B, T, D]   causal, at this level's rate
    h' = shift_right(h, K - 1)                   # h'[p] = h[p - K + 1], zeros for p < K - 1
    s = shorten(groups of K of h')               # [B, T1, D]  T1 = ceil(T / K), no padding needed
    y = inner(s)                                 # the next level (recursively), or its plain layers
    u = upsample(y, residual=h)                  # [B, T, D]   u[t] uses y[t // K] (see resampling.py)
    return post_layers(u)

and the LM is ``logits = dense(norm(hourglass(embed(ids) + sinusoid)))``.

**Hierarchy.** ``HourglassConfig.hierarchy`` uses the paper's notation: ``"2@1 4@3 2@1"`` is 2 layers at
the token rate, 4 layers at factor 3, 2 layers at the token rate; ``"1@1 2@2 4@4 2@2 1@1"`` nests two
shortenings (factors are absolute, relative to tokens: the second shortening is by 4 / 2 = 2). Factors
form a palindrome that strictly grows to the middle, each dividing the next.

**The shift and why it is causal.** Coarse vector j is made from ``h'[jK .. jK+K-1] = h[jK-K+1 .. jK]``:
the K fine vectors that end at fine position jK. The upsampled vector at fine position t uses coarse
vector ``t // K`` (and, for attention upsampling, coarse vectors before it), whose newest input is fine
position ``(t // K) * K <= t``. The inner level is causal among coarse vectors, so output t depends on
inputs ``<= t`` only. Without the shift, coarse j would cover ``h[jK .. jK+K-1]`` and leak up to K-1
future positions. Since ``ceil(T/K) * K <= T + K - 1``, the last group of the shifted sequence is made of
real positions only: a length that is not a multiple of K needs no padding and no mask, and the outputs
at positions < T do not depend on T.

**Positions.** Sinusoidal absolute positions are added to the token embedding (``sinusoidal``). With
``maximum_relative_position > 0`` every self-attention layer of every level also uses the relative
position tables of Shaw et al. (``MultiHeadAttention``), each layer with its own tables, with distances
counted in that level's own units: coarse slot j of a level is position j there (so a distance of 1 at
factor 4 spans 4 tokens). The attention resamplers carry no relative terms (their windows are tiny and
ordered by the absolute positions already mixed in).

**Cached decoding.** ``decode_step(ids [B], t, cache)`` runs level 0 at index t. A level at index i:

1. runs its pre layers as cached steps (KV slot i);
2. pushes the result into ``window [B, K, D]``, a shift register of the last K inputs to the shortening
   (it starts as zeros, which are exactly the shift's zeros for group 0);
3. if ``i % K == 0`` (``nn.cond``, static shapes), group ``j = i // K`` is now complete: it is shortened
   from the window, the inner level runs one step at index j (writing its own KV slot j, recursively),
   and the upsampler stores what it needs (attention: the coarse keys/values in slot j); the inner output
   ``y_j`` is kept in ``coarse [B, 1, D]``. Otherwise nothing of the inner level runs;
4. upsamples from ``coarse`` (which holds ``y_{i // K}``) and the residual, and runs its post layers.

So the level with absolute factor f runs exactly at the token steps ``t % f == 0``, at its index
``t // f``, and a group is never recomputed or overwritten. Each level's caches have
``ceil(S_parent / K)`` slots; every leaf has the batch axis first, so beam search tiles and reorders the
whole pytree unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
from flax import struct

from jaxformer.models.blocks import DecoderLayer
from jaxformer.models.cache import KVCache
from jaxformer.models.config import TransformerConfig
from jaxformer.models.layers import TokenEmbedding, layer_norm
from jaxformer.models.masks import causal_mask
from jaxformer.models.resampling import SHORTENING, UPSAMPLING
from jaxformer.typing import Array, Float, Int


class Level(NamedTuple):
    """One level of the hierarchy. The innermost level has ``post == 0`` and ``shorten == 0``."""

    factor: int  # absolute: relative to the token rate
    pre: int  # layers before the shortening (the innermost level: all its layers)
    post: int  # layers after the upsampling
    shorten: int  # K: the relative factor down to the next level; 0 for the innermost level


def parse_hierarchy(text: str) -> tuple[Level, ...]:
    """``"2@1 4@3 2@1"`` -> ``(Level(1, 2, 2, 3), Level(3, 4, 0, 0))``, with clear errors."""

    def fail(message: str):
        raise ValueError(f"HourglassConfig: hierarchy {text!r}: {message}")

    entries = []
    for token in text.split():
        match = re.fullmatch(r"(-?\d+)@(-?\d+)", token)
        if match is None:
            fail(f"each entry must be '<layers>@<factor>' like '2@1', got {token!r}")
        entries.append((int(match[1]), int(match[2])))
    if len(entries) < 3 or len(entries) % 2 == 0:
        fail("needs an odd number (>= 3) of entries, e.g. '2@1 4@2 2@1'")
    counts, factors = [e[0] for e in entries], [e[1] for e in entries]
    if any(n < 0 for n in counts):
        fail("layer counts must be >= 0")
    if factors != factors[::-1]:
        fail(f"factors must form a palindrome, got {factors}")
    if factors[0] != 1:
        fail(f"the outermost factor must be 1 (the token rate), got {factors[0]}")
    middle = len(entries) // 2
    for outer, inner in itertools.pairwise(factors[: middle + 1]):
        if inner <= outer or inner % outer:
            fail(f"factor {inner} must be larger than and divisible by {outer}")
    levels = [
        Level(factors[d], counts[d], counts[-1 - d], factors[d + 1] // factors[d])
        for d in range(middle)
    ]
    return (*levels, Level(factors[middle], counts[middle], 0, 0))


@dataclasses.dataclass(frozen=True)
class HourglassConfig:
    """Hyper-parameters of the Hourglass LM (frozen, hashable: safe as a static jit argument)."""

    vocab_size: int = 32
    d_model: int = 32
    num_heads: int = 4
    ffn_dim: int = 64
    hierarchy: str = "1@1 2@2 1@1"
    shortening: str = "average"  # one of resampling.SHORTENING
    upsampling: str = "repeat"  # one of resampling.UPSAMPLING
    dropout: float = 0.1
    attention_dropout: float = 0.1
    ffn_dropout: float = 0.1
    max_len: int = 512
    sinusoidal: bool = True  # absolute positions at the token embedding
    maximum_relative_position: int = 0  # > 0: relative attention at every level, in its own units
    dtype: str = "float32"

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"HourglassConfig: {message}")

        parse_hierarchy(self.hierarchy)
        need(
            self.shortening in SHORTENING,
            f"shortening must be one of {sorted(SHORTENING)}, got {self.shortening!r}",
        )
        need(
            self.upsampling in UPSAMPLING,
            f"upsampling must be one of {sorted(UPSAMPLING)}, got {self.upsampling!r}",
        )
        need(not self.sinusoidal or self.d_model % 2 == 0, "sinusoidal needs an even d_model")
        try:
            self.layer_config  # noqa: B018  (validates the shared fields: heads, rates, dtype, ...)
        except ValueError as error:
            raise ValueError(str(error).replace("TransformerConfig", "HourglassConfig")) from None

    @property
    def levels(self) -> tuple[Level, ...]:
        return parse_hierarchy(self.hierarchy)

    @property
    def layer_config(self) -> TransformerConfig:
        """The configuration of every Transformer layer (pre-norm, no cross-attention)."""
        return TransformerConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_encoder_layers=0,
            num_decoder_layers=1,
            ffn_dim=self.ffn_dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            ffn_dropout=self.ffn_dropout,
            max_len=self.max_len,
            maximum_relative_position=self.maximum_relative_position,
            pre_norm=True,
            dtype=self.dtype,
        )

    def replace(self, **changes) -> HourglassConfig:
        return dataclasses.replace(self, **changes)


HOURGLASS_PRESETS: dict[str, HourglassConfig] = {
    # Small enough for tests: one shortening by 2, lengths up to 128.
    "tiny": HourglassConfig(
        vocab_size=32, d_model=32, num_heads=4, ffn_dim=64, hierarchy="1@1 2@2 1@1", max_len=128
    ),
}


def hourglass_preset(name: str, **overrides) -> HourglassConfig:
    if name not in HOURGLASS_PRESETS:
        raise ValueError(
            f"unknown hourglass preset {name!r}; choose one of {sorted(HOURGLASS_PRESETS)}"
        )
    return HOURGLASS_PRESETS[name].replace(**overrides)


@struct.dataclass
class HourglassCache:
    """One level's decoding state; ``inner`` nests the next level's. Batch axis first everywhere.

    S is this level's cache length, S1 = ceil(S / K) the next level's. The innermost level has only
    ``pre`` (its layers); the other fields are None there.
    """

    pre: Any  # tuple[KVCache, ...]: float[B, N, S, H] per pre layer (innermost: per layer)
    post: Any  # tuple[KVCache, ...]: float[B, N, S, H] per post layer
    window: (
        Any  # float[B, K, D]: the last K inputs to the shortening, oldest first (None innermost)
    )
    coarse: Any  # float[B, 1, D]: the inner level's latest output y_{i // K} (None innermost)
    upsampling: (
        Any  # KVCache float[B, N, S1, H] of the coarse outputs (attention upsampling) or None
    )
    inner: Any  # HourglassCache of the next level, or None


def _step_layers(layers, x, index, caches):
    new = []
    for layer, kv in zip(layers, caches, strict=True):
        x, kv, _ = layer.step(x, index, kv, None, None)
        new.append(kv)
    return x, tuple(new)


class HourglassLevel(nn.Module):
    """Level ``depth`` of the hierarchy and, through ``inner``, every level below it."""

    config: HourglassConfig
    depth: int = 0

    def setup(self):
        c = self.config
        level = c.levels[self.depth]
        layer_config = c.layer_config
        make = lambda kind, n: [
            DecoderLayer(layer_config, cross_attention=False, name=f"{kind}_{i}") for i in range(n)
        ]
        self.pre = make("pre", level.pre)
        self.post = make("post", level.post)
        if level.shorten:
            args = (level.shorten, c.d_model, c.num_heads, c.ffn_dim, jnp.dtype(c.dtype))
            self.shortening = SHORTENING[c.shortening](*args, name="shortening")
            self.upsampling = UPSAMPLING[c.upsampling](*args, name="upsampling")
            self.inner = HourglassLevel(c, self.depth + 1, name="inner")

    @property
    def factor(self) -> int:
        return self.config.levels[self.depth].shorten  # K; 0 at the innermost level

    def __call__(
        self, x: Float[Array, "B T D"], deterministic: bool = True
    ) -> Float[Array, "B T D"]:
        b, t, d = x.shape
        mask = causal_mask(t)[None, None]  # [1, 1, T, T]
        for layer in self.pre:
            x, _ = layer(x, mask, deterministic=deterministic)
        k = self.factor
        if not k:
            return x
        t1 = -(-t // k)
        shifted = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))[:, : t1 * k]  # [B, T1*K, D], no padding
        y = self.inner(self.shortening(shifted.reshape(b, t1, k, d)), deterministic)  # [B, T1, D]
        u = self.upsampling(y, x)  # [B, T, D]
        for layer in self.post:
            u, _ = layer(u, mask, deterministic=deterministic)
        return u

    def init_cache(self, batch: int, length: int) -> HourglassCache:
        c = self.config
        kv = lambda n: tuple(
            KVCache.zeros(batch, length, c.num_heads, c.layer_config.head_dim, jnp.dtype(c.dtype))
            for _ in range(n)
        )
        k = self.factor
        if not k:
            return HourglassCache(kv(len(self.pre)), (), None, None, None, None)
        coarse_length = -(-length // k)
        return HourglassCache(
            pre=kv(len(self.pre)),
            post=kv(len(self.post)),
            window=jnp.zeros((batch, k, c.d_model), jnp.dtype(c.dtype)),
            coarse=jnp.zeros((batch, 1, c.d_model), jnp.dtype(c.dtype)),
            upsampling=self.upsampling.init_cache(batch, coarse_length),
            inner=self.inner.init_cache(batch, coarse_length),
        )

    def step(
        self, x: Float[Array, "B 1 D"], index: Int[Array, ""], cache: HourglassCache
    ) -> tuple[Float[Array, "B 1 D"], HourglassCache]:
        """Position ``index`` of this level (its own units); see the module docstring."""
        x, pre = _step_layers(self.pre, x, index, cache.pre)
        k = self.factor
        if not k:
            return x, cache.replace(pre=pre)
        # [B, K, D] --> [B, K, D]: the oldest vector out, h[index] in: now h[index-K+1 .. index].
        window = jnp.concatenate([cache.window[:, 1:], x], axis=1)

        def run_inner(level, window, coarse, inner, upsampling):
            s = level.shortening(window[:, None])  # [B, 1, K, D] -> [B, 1, D]
            y, inner = level.inner.step(s, index // k, inner)
            return y, inner, level.upsampling.write(y, index // k, upsampling)

        def keep(level, window, coarse, inner, upsampling):
            return coarse, inner, upsampling

        coarse, inner, upsampling = nn.cond(
            index % k == 0,
            run_inner,
            keep,
            self,
            window,
            cache.coarse,
            cache.inner,
            cache.upsampling,
        )
        u = self.upsampling.step(coarse, x, index, upsampling)  # [B, 1, D]
        u, post = _step_layers(self.post, u, index, cache.post)
        return u, HourglassCache(pre, post, window, coarse, upsampling, inner)


class HourglassLM(nn.Module):
    """``__call__(ids) -> logits``, ``init_cache(batch, max_length)``, ``decode_step(ids, step, cache)``."""

    INPUTS: ClassVar[tuple[str, ...]] = ("ids",)  # the token arrays __call__ takes

    config: HourglassConfig

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.embedding = TokenEmbedding(
            c.vocab_size, c.d_model, c.max_len, c.sinusoidal, dtype, name="embedding"
        )
        self.hourglass = HourglassLevel(c, 0, name="hourglass")
        self.final_norm = layer_norm("final_norm", dtype)
        self.output = nn.Dense(c.vocab_size, dtype=dtype, name="output")
        self.drop = nn.Dropout(c.dropout)

    def _check_length(self, name: str, length: int):
        if length > self.config.max_len:
            raise ValueError(
                f"{name} has length {length}, more than the model's max_len={self.config.max_len}"
            )

    def _logits(self, y):
        return self.output(self.final_norm(y)).astype(jnp.float32)

    def __call__(self, ids: Int[Array, "B T"], deterministic: bool = True) -> Float[Array, "B T V"]:
        """The full causal pass (training, scoring). Any length T <= max_len, multiple of K or not."""
        self._check_length("ids", ids.shape[1])
        x = self.drop(self.embedding(ids, jnp.arange(ids.shape[1])), deterministic=deterministic)
        return self._logits(self.hourglass(x, deterministic))

    def init_cache(self, batch: int, max_length: int) -> HourglassCache:
        self._check_length("max_length", max_length)
        return self.hourglass.init_cache(batch, max_length)

    def decode_step(
        self, ids: Int[Array, " B"], step: int | Int[Array, ""], cache: HourglassCache
    ) -> tuple[Float[Array, "B V"], HourglassCache, None]:
        """One token at position ``step`` (inference: no dropout); the search's step function."""
        step = jnp.asarray(step, jnp.int32)
        x = self.embedding(ids[:, None], step[None])  # [B, 1, D]
        y, cache = self.hourglass.step(x, step, cache)
        return self._logits(y[:, 0]), cache, None


def hourglass_step_fn(model: HourglassLM, params):
    """``dynamic_decode``'s step function for an Hourglass LM: the cache is the state."""

    def step_fn(ids, step, cache):
        return model.apply({"params": params}, ids, step, cache, method=HourglassLM.decode_step)

    return step_fn
