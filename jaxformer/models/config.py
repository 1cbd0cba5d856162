"""Model configurations: frozen, hashable dataclasses (safe as static jit arguments) and named presets."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the encoder-decoder Transformer and of the decoder-only LM.

    ``maximum_relative_position > 0`` switches self-attention to the relative position representations
    of Shaw et al. (2018), as OpenNMT-tf does, and drops the sinusoidal absolute encodings; 0 keeps the
    sinusoidal encodings of Vaswani et al. (2017).
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

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"TransformerConfig: {message}")

        need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        need(
            self.src_vocab_size is None or self.src_vocab_size >= 2,
            f"src_vocab_size must be None or >= 2, got {self.src_vocab_size}",
        )
        need(self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        need(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        need(
            self.d_model % self.num_heads == 0,
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
            self.maximum_relative_position > 0 or self.d_model % 2 == 0,
            "sinusoidal positions need an even d_model",
        )

    @property
    def source_vocab_size(self) -> int:
        return self.vocab_size if self.src_vocab_size is None else self.src_vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def relative(self) -> bool:
        return self.maximum_relative_position > 0

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, TransformerConfig] = {
    # Small enough for every test to run in milliseconds.
    "tiny": TransformerConfig(
        vocab_size=32,
        d_model=32,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        ffn_dim=64,
        max_len=128,
    ),
    # The CTranslate2 benchmark's small model (issue 6).
    "small": TransformerConfig(
        vocab_size=8000,
        d_model=256,
        num_heads=4,
        num_encoder_layers=3,
        num_decoder_layers=3,
        ffn_dim=1024,
        max_len=1024,
    ),
    # Transformer base (Vaswani et al. 2017): 6+6 layers, D 512, N 8, F 2048.
    "base": TransformerConfig(
        vocab_size=32000,
        d_model=512,
        num_heads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        ffn_dim=2048,
        max_len=1024,
    ),
    # The toy model of the OpenNMT-tf inference article: vocab 26, num_units 6, 1 layer, 2 heads,
    # ffn_inner_dim 12, maximum_relative_position 8.
    "article": TransformerConfig(
        vocab_size=26,
        d_model=6,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        ffn_dim=12,
        maximum_relative_position=8,
        max_len=256,
    ),
}


def preset(name: str, **overrides) -> TransformerConfig:
    """A named preset, optionally with some fields replaced: ``preset("tiny", pre_norm=False)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
