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

**Cached decoding.** ``decode_step(ids [R], t, cache)`` runs level 0 at index t, a scalar or ``int32[R]``
(each row at its own position: ragged prompts). A level at index i, for each row:

1. runs its pre layers as cached steps (KV slot i): ``h_i``;
2. reads ``h[i-K+1 .. i-1]`` from its ``stream`` (zeros before position 0: the shift's zeros) and
   shortens the group ``h[i-K+1 .. i]``;
3. runs the inner level one step, at every step and in every row: at index ``j = i // K`` in the rows
   where ``i % K == 0`` (group j is complete exactly there), else at the inner level's scratch index;
4. uses its output ``y_j`` in the rows where group j completed; the others take the coarse output in
   force, ``y_{i // K}``, from the stream's slot ``i - 1``;
5. writes ``(h_i, y_{i // K})`` into slot i of its stream, upsamples and runs its post layers.

Below the top level every cache has one slot more than its positions, the **scratch slot** (index S).
A row whose inner step is not wanted runs it at index S: it writes its keys, values, stream and coarse
keys into the scratch slots (and its own inner level at that level's scratch index), attends to
whatever is there, and its output is dropped. No row at a real position ever reads a scratch slot
(slot S is past every position ``<= S - 1`` that attention may see), so a level's slot j holds exactly
what the step that completed group j wrote: every cache is slot-indexed, and each row reads its own
positions only. No ``lax.cond`` chooses between running the inner level or not (a cond's branches
return the whole inner cache, which XLA copied at every step), and no write has to be undone. The
price: the inner levels compute at every token step (before, the level of absolute factor f ran at
1/f of them).
``prefill(ids [B, P], cache)`` writes every position slot as P steps at positions 0..P-1 would, with
one full pass per level (``__call__(x, cache=...)``): ``ceil(P / f)`` slots at the level of absolute
factor f (only steps write the scratch slots, and nothing reads them).

**Beam search.** Every cache is a ``KVCache`` with ``indirect=True``: the layers' keys and values, the
attention upsampler's coarse keys and values, and the stream (``h`` as "keys", ``y_{t // K}`` as
"values", one head of width D). Tiled for beam search they become ``BeamKVCache``s: a reorder moves
their origin tables only, never a slot, and the stream's slots are read through that table
(``BeamKVCache.read``). A level of S positions has ``ceil(S / K)`` positions below it (+1: scratch).
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

    S is this level's number of positions, S1 = ceil(S / K) the next level's; slot i holds position i
    of this level, and below the top level slot S is the scratch slot (written by rows whose step is
    discarded, read by none). The innermost level has only ``pre`` (its layers); the other fields are
    None there.
    """

    pre: Any  # tuple[KVCache, ...]: float[B, N, S(+1), H] per pre layer (innermost: per layer)
    post: Any  # tuple[KVCache, ...]: float[B, N, S(+1), H] per post layer
    stream: Any  # KVCache: k = h_i, v = y_{i // K}, float[B, 1, S(+1), D] each (None innermost)
    upsampling: Any  # KVCache float[B, N, S1+1, H]: the coarse keys/values (attention) or None
    inner: Any  # HourglassCache of the next level, or None
    # S: the position slots 0..S-1; below the top level one more slot, S, is the scratch slot.
    length: int = struct.field(pytree_node=False, default=0)


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
        self,
        x: Float[Array, "B T D"],
        deterministic: bool = True,
        cache: HourglassCache | None = None,
    ) -> tuple[Float[Array, "B T D"], HourglassCache | None]:
        """The full causal pass. With ``cache`` (inference: no dropout) it also writes slots 0..T-1
        of every cache of this level and below, as T decode steps would (the prefill)."""
        b, t, d = x.shape
        mask = causal_mask(t)[None, None]  # [1, 1, T, T]

        def layers(stack, x, caches):
            if cache is None:
                for layer in stack:
                    x, _ = layer(x, mask, deterministic=deterministic)
                return x, None
            new = []
            for layer, kv in zip(stack, caches, strict=True):
                x, kv = layer.prefill(x, mask, kv)
                new.append(kv)
            return x, tuple(new)

        x, pre = layers(self.pre, x, cache and cache.pre)
        k = self.factor
        if not k:
            return x, cache and cache.replace(pre=pre)
        t1 = -(-t // k)
        shifted = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))[:, : t1 * k]  # [B, T1*K, D], no padding
        s = self.shortening(shifted.reshape(b, t1, k, d))  # [B, T1, D]
        y, inner = self.inner(s, deterministic, cache and cache.inner)  # [B, T1, D]
        u = self.upsampling(y, x)  # [B, T, D]
        u, post = layers(self.post, u, cache and cache.post)
        if cache is None:
            return u, None
        in_force = jnp.repeat(y, k, axis=1)[:, :t]  # [B, T, D]: y_{i // K} at position i
        stream = cache.stream.write(x[:, :, None], in_force[:, :, None], 0)  # [B, T, 1, D]
        upsampling = self.upsampling.write(y, 0, cache.upsampling)
        return u, cache.replace(
            pre=pre, post=post, stream=stream, upsampling=upsampling, inner=inner
        )

    def init_cache(self, batch: int, length: int) -> HourglassCache:
        """Caches for ``length`` positions, plus the scratch slot below the top level."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        slots = length + (self.depth > 0)
        zeros = lambda heads, width: KVCache.zeros(batch, slots, heads, width, dtype, indirect=True)
        kv = lambda n: tuple(zeros(c.num_heads, c.layer_config.head_dim) for _ in range(n))
        k = self.factor
        if not k:
            return HourglassCache(kv(len(self.pre)), (), None, None, None, length)
        coarse_length = -(-length // k)
        return HourglassCache(
            pre=kv(len(self.pre)),
            post=kv(len(self.post)),
            stream=zeros(1, c.d_model),
            upsampling=self.upsampling.init_cache(batch, coarse_length + 1),
            inner=self.inner.init_cache(batch, coarse_length),
            length=length,
        )

    def step(
        self,
        x: Float[Array, "R 1 D"],
        index: Int[Array, ""] | Int[Array, " R"],
        cache: HourglassCache,
    ) -> tuple[Float[Array, "R 1 D"], HourglassCache]:
        """Position ``index`` of this level (its own units), a scalar or one per row; a row at the
        scratch index ``cache.length`` runs and writes only the scratch slots (its output is for
        nobody). See the module docstring."""
        h, pre = _step_layers(self.pre, x, index, cache.pre)  # h_i: [R, 1, D]
        k = self.factor
        if not k:
            return h, cache.replace(pre=pre)
        rows = x.shape[0]
        complete = index % k == 0  # group index // K ends here (scalar or [R])
        # --> the inner index: j = i // K where group j completes, else the inner scratch slot.
        inner_index = jnp.where(complete & (index < cache.length), index // k, cache.inner.length)
        # The group h[i-K+1 .. i]: K-1 earlier inputs from the stream, zeros before position 0.
        slots = jnp.reshape(index, (-1, 1)) + jnp.arange(1 - k, 0)[None]  # [1 or R, K-1]
        slots = jnp.broadcast_to(slots, (rows, k - 1))
        earlier, in_force = cache.stream.read(jnp.maximum(slots, 0))  # [R, K-1, 1, D] each
        earlier = jnp.where((slots >= 0)[:, :, None], earlier[:, :, 0], 0)  # [R, K-1, D]
        s = self.shortening(
            jnp.concatenate([earlier, h], axis=1)[:, None]
        )  # [R, 1, K, D] -> [R, 1, D]
        y_new, inner = self.inner.step(s, inner_index, cache.inner)  # [R, 1, D]
        # --> [R, 1, D]: y_j where group j just completed, else y_{i // K} (slot i-1 holds it).
        y = jnp.where(jnp.reshape(complete, (-1, 1, 1)), y_new, in_force[:, -1])
        upsampling = self.upsampling.write(y_new, inner_index, cache.upsampling)
        stream = cache.stream.write(h[:, :, None], y[:, :, None], index)  # slot i: (h_i, y_{i//K})
        u = self.upsampling.step(y, h, index, upsampling)  # [R, 1, D]
        u, post = _step_layers(self.post, u, index, cache.post)
        return u, cache.replace(
            pre=pre, post=post, stream=stream, upsampling=upsampling, inner=inner
        )


class HourglassLM(nn.Module):
    """``__call__(ids) -> logits``, ``init_cache``, ``prefill(ids, cache)``, ``decode_step``."""

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

    def _check_length(self, name: str, length: int, limit: int | None = None):
        what = "the model's max_len" if limit is None else "the cache length"
        limit = self.config.max_len if limit is None else limit
        if length > limit:
            raise ValueError(f"{name} has length {length}, more than {what}={limit}")

    def _logits(self, y):
        return self.output(self.final_norm(y)).astype(jnp.float32)

    def __call__(self, ids: Int[Array, "B T"], deterministic: bool = True) -> Float[Array, "B T V"]:
        """The full causal pass (training, scoring). Any length T <= max_len, multiple of K or not."""
        self._check_length("ids", ids.shape[1])
        x = self.drop(self.embedding(ids, jnp.arange(ids.shape[1])), deterministic=deterministic)
        y, _ = self.hourglass(x, deterministic)
        return self._logits(y)

    def init_cache(self, batch: int, max_length: int) -> HourglassCache:
        self._check_length("max_length", max_length)
        return self.hourglass.init_cache(batch, max_length)

    def prefill(
        self, ids: Int[Array, "B P"], cache: HourglassCache
    ) -> tuple[Float[Array, "B P V"], HourglassCache]:
        """A prompt at positions 0..P-1 in one full pass per level: the logits and every cache as P
        ``decode_step``s would leave them."""
        self._check_length("the prompt", ids.shape[1], cache.length)
        x = self.embedding(ids, jnp.arange(ids.shape[1]))
        y, cache = self.hourglass(x, True, cache)
        return self._logits(y), cache

    def decode_step(
        self,
        ids: Int[Array, " R"],
        step: int | Int[Array, ""] | Int[Array, " R"],
        cache: HourglassCache,
    ) -> tuple[Float[Array, "R V"], HourglassCache, None]:
        """One token per row at position ``step`` (a scalar, or one per row); the search's step."""
        step = jnp.asarray(step, jnp.int32)
        positions = step[None] if step.ndim == 0 else step[:, None]  # [1] or [R, 1]
        x = self.embedding(ids[:, None], positions)  # [R, 1, D]
        y, cache = self.hourglass.step(x, step, cache)
        return self._logits(y[:, 0]), cache, None
