"""Model configurations: frozen, hashable dataclasses (safe as static jit arguments); named ones are in
``presets.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jaxformer.models.activations import ACTIVATIONS
from jaxformer.models.norms import NORMS
from jaxformer.models.positions import LAYOUTS, POSITIONS, RATE_DENOMINATORS
from jaxformer.models.quantization import QUANTIZATIONS
from jaxformer.models.rotary import RopeScaling


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the encoder-decoder Transformer and of the decoder-only LM.

    ``maximum_relative_position > 0`` switches self-attention to the relative position representations
    of Shaw et al. (2018), as OpenNMT-tf does, and (unless ``positions`` says otherwise) drops the
    sinusoidal absolute encodings; 0 keeps the sinusoidal encodings of Vaswani et al. (2017).

    ``quantization="int8"`` (inference) multiplies every projection's int8 activations by int8
    weights, as CTranslate2's int8 does (``models/quantization.py``); the parameters stay float32, so
    a trained model decodes in int8 with ``dataclasses.replace(config, quantization="int8")``.

    The fields after ``quantization`` describe other implementations' models; their defaults are jaxformer's
    own, so configs written before they existed load unchanged. Each is resolved when a module is
    built (``models/norms.py``, ``activations.py``, ``positions.py`` explain them):

    - ``layer_norm_epsilon``: 1e-6 by default; OpenNMT-tf uses 1e-3 (Keras's default), T5 1e-6,
      BART / Marian / M2M100 1e-5. ``norm``: ``"layer"``, ``"rms"`` (T5: no bias, no mean) or
      ``"gemma_rms"`` (below).
    - ``final_norm``: a norm after each stack; None follows ``pre_norm`` (today's models).
    - ``activation``: one of ``activations.ACTIVATIONS`` (relu, gelu, gelu_tanh, silu/swish, and
      ``gated-*``, geglu, swiglu; T5 v1.1 / mT5: ``gated-gelu_tanh``).
    - ``positions``: absolute encodings ``"sinusoidal"``, ``"learned"``, ``"none"``, or ``"rotary"``
      (below); None means ``"none"`` with relative positions and ``"sinusoidal"`` without (today's
      rule).
      ``position_layout`` (``"interleaved"`` | ``"concat"``), ``position_rate_denominator``
      (``"D/2"`` | ``"D/2-1"``) and ``position_offset`` (index of the first token: OpenNMT-tf 1,
      M2M100 / NLLB 2, BART's learned table 2).
    - ``embedding_scale``: the factor on token embeddings; None is sqrt(d_model) (today), 1.0 none
      (T5, BART without ``scale_embedding``). ``embedding_norm``: a norm after embeddings and
      positions, one per side (BART's ``layernorm_embedding``).
    - ``final_logits_bias``: a zero-initialised bias added to the logits (Marian, BART), kept out of
      training by a stop-gradient. ``output_bias``: a bias in the output projection; None means a bias
      unless the projection is tied (today); True with a tied projection keeps one (OpenNMT-tf).
      ``tied_output_scale``: multiply by d_model**-0.5 before a tied projection (T5 v1.0).
    - ``attention_head_dim``: H, when not d_model / num_heads (T5's ``d_kv``; inner width N*H).
      ``query_scaling``: divide scores by sqrt(H) (False: T5). ``attention_bias`` / ``ffn_bias``:
      biases in the attention / feed-forward projections (T5: none).
    - ``relative_attention_num_buckets > 0``: T5's bucketed relative attention bias (``t5_buckets.py``)
      with ``relative_attention_max_distance``; one table per stack, shared by its layers
      (T5: 32 buckets, 128; it uses ``positions="none"``).

    Options of decoder-only checkpoints (Llama, Mistral, Qwen2, Gemma, GPT-2); their defaults change
    nothing, neither the computation nor the parameter tree:

    - ``positions="rotary"``: rotary position embeddings (Su et al. 2021; Llama, Mistral, Qwen2,
      Gemma) in Hugging Face's rotate_half layout, in every self-attention (``rotary.py``); nothing
      added to the embeddings. ``rope_theta``: the base of the inverse frequencies (10000; Llama 3
      500000, Qwen2 1e6). ``rope_scaling``: None or a ``RopeScaling`` (``"linear"`` with ``factor``;
      ``"llama3"`` with ``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``); a mapping with those keys (Hugging Face's
      ``rope_scaling``) is converted to one, unknown types and keys are refused by name.
    - ``num_kv_heads``: K key/value heads shared by groups of ``num_heads / K`` query heads
      (grouped-query attention, Ainslie et al. 2023; multi-query with K = 1, Shazeer 2019); None is
      ``num_heads``. Query head n reads key/value head ``n // (num_heads / K)`` (transformers'
      ``repeat_kv``). The KV caches hold K heads. Parameters: with K == N, today's fused
      ``qkv [D, 3, N, H]``; with K < N, ``query [D, N, H]`` and ``kv [D, 2, K, H]`` (cross-attention
      too: its ``kv`` has K heads).
    - ``sliding_window``: W, key j is visible to query i iff ``j <= i`` and ``i - j < W`` (Mistral;
      the convention of transformers' ``masking_utils.sliding_window_causal_mask_function``: a query
      sees itself and the W - 1 keys before it). Decoder-only LMs only; the caches stay preallocated
      to the full length and masked (no ring buffer).
    - ``attention_out_bias``: a bias on the attention output projection; None follows
      ``attention_bias`` (Qwen2: biases on q, k, v but none on the output: True / False).
    - ``norm="gemma_rms"``: RMSNorm times ``(1 + scale)``, ``scale`` initialised at 0 (Gemma).
    - Gemma scales its embeddings by sqrt(d_model): ``embedding_scale=None``. transformers rounds
      that factor to the activations' dtype before multiplying (``torch.tensor(hidden_size**0.5,
      dtype=...)``); jaxformer takes the float32 square root and casts the product. In float32
      both are the same number (a float32 square root is correctly rounded; checked for every
      d_model up to 20000), so float32 logits agree; in bfloat16 transformers multiplies by the
      rounded factor (sqrt(3072) = 55.43 becomes 55.5): ``embedding_scale=55.5`` reproduces it.
    """

    vocab_size: int = 32
    src_vocab_size: int | None = None  # None: same as vocab_size
    d_model: int = 32
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    ffn_dim: int = 64
    dropout: float = 0.1
    attention_dropout: float = 0.1
    ffn_dropout: float = 0.1
    max_len: int = 512  # longest source and target the position tables cover
    maximum_relative_position: int = 0
    pre_norm: bool = True  # pre-norm with a final layer norm; False: post-norm (the original paper)
    share_embeddings: bool = False  # one table for source and target (needs equal vocabularies)
    share_output_embeddings: bool = False  # the output projection reuses the target embedding
    pad_id: int = 0
    dtype: str = "float32"  # activation dtype; parameters stay float32
    quantization: str | None = None  # "int8": the projections' products in int8 (quantization.py)
    # Other implementations' options (see the class docstring); defaults reproduce jaxformer's models.
    layer_norm_epsilon: float = 1e-6  # OpenNMT-tf: 1e-3
    norm: str = "layer"  # "layer" | "rms"
    final_norm: bool | None = None  # None: exactly when pre_norm
    activation: str = "relu"
    positions: str | None = None  # "sinusoidal" | "learned" | "rotary" | "none"; None: docstring
    position_layout: str = "interleaved"  # "interleaved" | "concat"
    position_rate_denominator: str = "D/2"  # "D/2" | "D/2-1"
    position_offset: int = 0  # position index of the first token
    embedding_scale: float | None = None  # None: sqrt(d_model)
    embedding_norm: bool = False
    final_logits_bias: bool = False
    output_bias: bool | None = None  # None: unless share_output_embeddings
    tied_output_scale: bool = False
    attention_head_dim: int | None = None  # None: d_model // num_heads
    query_scaling: bool = True
    attention_bias: bool = True
    ffn_bias: bool = True
    relative_attention_num_buckets: int = 0  # T5's bucketed relative bias; 0: off
    relative_attention_max_distance: int = 128
    # Decoder-only checkpoints' options (Llama, Mistral, Qwen2, Gemma; see the class docstring).
    rope_theta: float = 10000.0  # positions="rotary": inverse frequencies theta^(-2i/H)
    rope_scaling: RopeScaling | Mapping | None = None  # a mapping becomes a RopeScaling (rotary.py)
    num_kv_heads: int | None = None  # None: num_heads; fewer: grouped-query attention
    sliding_window: int | None = None  # key j visible to query i iff 0 <= i - j < sliding_window
    attention_out_bias: bool | None = None  # None: attention_bias

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"TransformerConfig: {message}")

        if isinstance(self.rope_scaling, Mapping):  # e.g. Hugging Face's rope_scaling, or JSON
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling.of(self.rope_scaling))
            except ValueError as error:
                need(False, str(error))

        need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        need(
            self.src_vocab_size is None or self.src_vocab_size >= 2,
            f"src_vocab_size must be None or >= 2, got {self.src_vocab_size}",
        )
        need(self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        need(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        need(
            self.attention_head_dim is not None or self.d_model % self.num_heads == 0,
            f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})",
        )
        need(self.num_encoder_layers >= 0, "num_encoder_layers must be >= 0")
        need(self.num_decoder_layers >= 1, "num_decoder_layers must be >= 1")
        need(self.ffn_dim >= 1, f"ffn_dim must be >= 1, got {self.ffn_dim}")
        for name in ("dropout", "attention_dropout", "ffn_dropout"):
            rate = getattr(self, name)
            need(0.0 <= rate < 1.0, f"{name} must be in [0, 1), got {rate}")
        need(self.max_len >= 1, f"max_len must be >= 1, got {self.max_len}")
        need(
            self.maximum_relative_position >= 0,
            f"maximum_relative_position must be >= 0, got {self.maximum_relative_position}",
        )
        need(
            not self.share_embeddings or self.source_vocab_size == self.vocab_size,
            "share_embeddings needs src_vocab_size == vocab_size",
        )
        need(0 <= self.pad_id < self.vocab_size, f"pad_id must be in [0, {self.vocab_size})")
        need(self.dtype in ("float32", "bfloat16", "float16"), f"unknown dtype {self.dtype!r}")
        need(
            self.quantization in QUANTIZATIONS,
            f"quantization must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}",
        )
        need(
            self.absolute_positions != "sinusoidal" or self.d_model % 2 == 0,
            "sinusoidal positions need an even d_model",
        )
        self._check_options(need)

    def _check_options(self, need):
        """The fields of other implementations' options: a message naming the field and what it takes."""

        def one_of(name: str, allowed):
            value = getattr(self, name)
            need(value in allowed, f"{name} must be one of {list(allowed)}, got {value!r}")

        def flag(name: str, optional: bool = False):
            value = getattr(self, name)
            ok = isinstance(value, bool) or (optional and value is None)
            need(ok, f"{name} must be {'None, ' if optional else ''}True or False, got {value!r}")

        eps = self.layer_norm_epsilon
        need(
            isinstance(eps, int | float) and not isinstance(eps, bool) and 0 < eps < 1,
            f"layer_norm_epsilon must be a number in (0, 1), got {eps!r}",
        )
        one_of("norm", NORMS)
        one_of("activation", ACTIVATIONS)
        one_of("positions", (None, *POSITIONS))
        one_of("position_layout", LAYOUTS)
        one_of("position_rate_denominator", RATE_DENOMINATORS)
        need(
            self.absolute_positions != "sinusoidal"
            or self.position_rate_denominator != "D/2-1"
            or self.d_model >= 4,
            "position_rate_denominator 'D/2-1' needs d_model >= 4",
        )
        offset = self.position_offset
        need(
            isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0,
            f"position_offset must be an int >= 0, got {offset!r}",
        )
        scale = self.embedding_scale
        need(
            scale is None
            or (isinstance(scale, int | float) and not isinstance(scale, bool) and scale > 0),
            f"embedding_scale must be None (sqrt(d_model)) or a number > 0, got {scale!r}",
        )
        flags = ("embedding_norm", "final_logits_bias", "tied_output_scale", "query_scaling")
        for name in (*flags, "attention_bias", "ffn_bias"):
            flag(name)
        flag("final_norm", optional=True)
        flag("output_bias", optional=True)
        need(
            not self.tied_output_scale or self.share_output_embeddings,
            "tied_output_scale needs share_output_embeddings=True",
        )
        self._check_attention_options(need)
        self._check_decoder_only_options(need)

    def _check_attention_options(self, need):
        """T5's relative buckets and the attention head width."""
        buckets, distance = (
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
        )
        need(
            isinstance(buckets, int) and (buckets == 0 or buckets >= 4),
            f"relative_attention_num_buckets must be 0 (off) or an int >= 4, got {buckets!r}",
        )
        need(
            isinstance(distance, int) and distance > buckets // 2,
            f"relative_attention_max_distance must be an int > relative_attention_num_buckets // 2 "
            f"({buckets // 2}), got {distance!r}",
        )
        need(
            not (buckets and self.relative),
            "relative_attention_num_buckets (T5) and maximum_relative_position (Shaw) exclude each other",
        )
        head = self.attention_head_dim
        need(
            head is None or (isinstance(head, int) and not isinstance(head, bool) and head >= 1),
            f"attention_head_dim must be None (d_model // num_heads) or an int >= 1, got {head!r}",
        )

    def _check_decoder_only_options(self, need):
        """Rotary positions, grouped key/value heads, the sliding window, the output bias."""
        rotary = self.absolute_positions == "rotary"
        theta = self.rope_theta
        need(
            isinstance(theta, int | float) and not isinstance(theta, bool) and theta > 0,
            f"rope_theta must be a number > 0, got {theta!r}",
        )
        need(
            self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
            f"rope_scaling must be None, a RopeScaling or a mapping, got {self.rope_scaling!r}",
        )
        need(
            self.rope_scaling is None or rotary,
            f"rope_scaling needs positions='rotary', got positions={self.positions!r}",
        )
        need(
            not rotary or self.head_dim % 2 == 0,
            f"positions='rotary' needs an even head width, got {self.head_dim}",
        )
        kv = self.num_kv_heads
        whole = isinstance(kv, int) and not isinstance(kv, bool) and kv >= 1
        need(
            kv is None or (whole and self.num_heads % kv == 0),
            f"num_kv_heads must be None (num_heads) or an int >= 1 that divides num_heads "
            f"({self.num_heads}), got {kv!r}",
        )
        window = self.sliding_window
        need(
            window is None
            or (isinstance(window, int) and not isinstance(window, bool) and window >= 1),
            f"sliding_window must be None (no window) or an int >= 1, got {window!r}",
        )
        out_bias = self.attention_out_bias
        need(
            out_bias is None or isinstance(out_bias, bool),
            f"attention_out_bias must be None (attention_bias), True or False, got {out_bias!r}",
        )

    @property
    def source_vocab_size(self) -> int:
        return self.vocab_size if self.src_vocab_size is None else self.src_vocab_size

    @property
    def head_dim(self) -> int:
        """H: ``attention_head_dim``, or ``d_model // num_heads`` when that is None."""
        if self.attention_head_dim is not None:
            return self.attention_head_dim
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """K: ``num_kv_heads``, or ``num_heads`` when that is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def has_attention_out_bias(self) -> bool:
        """``attention_out_bias`` resolved: None follows ``attention_bias``."""
        if self.attention_out_bias is None:
            return self.attention_bias
        return self.attention_out_bias

    @property
    def relative(self) -> bool:
        return self.maximum_relative_position > 0

    @property
    def absolute_positions(self) -> str:
        """``positions`` resolved: None is "none" with relative positions, else "sinusoidal"."""
        if self.positions is not None:
            return self.positions
        return "none" if self.relative else "sinusoidal"

    @property
    def has_final_norm(self) -> bool:
        """A norm after each stack: ``final_norm``, or (None) exactly when pre-norm."""
        return self.pre_norm if self.final_norm is None else self.final_norm

    @property
    def has_output_bias(self) -> bool:
        """``output_bias`` resolved: None is a bias unless the output projection is tied."""
        if self.output_bias is not None:
            return self.output_bias
        return not self.share_output_embeddings

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)
