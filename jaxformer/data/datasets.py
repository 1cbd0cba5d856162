"""From a ``DataConfig`` to text splits, tokenizers (trained on the training split, stored with the
run) and id batches: the data half of ``jaxformer train``.

Translation corpora give ``(source, target)`` pairs; the language-model corpus gives one text.
Tokenizers live in ``workdir/tokenizers/{source,target}`` (an LM uses ``target`` only); a resumed run
or ``jaxformer translate`` loads them instead of training new ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxformer.data.batching import (
    Batch,
    BatchConfig,
    BatchStats,
    Buckets,
    bucket_batches,
    lm_windows,
)
from jaxformer.data.config import DataConfig
from jaxformer.data.corpora import (
    Pair,
    Split,
    bible_pairs,
    number_pairs,
    shakespeare_text,
    split_pairs,
    split_text,
)
from jaxformer.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    encode_all,
    load_tokenizer,
)

LENGTH_STEP = 16  # bucket boundaries: multiples of 16 tokens up to data.max_length


def text_pairs(config: DataConfig) -> Split[list[Pair]]:
    """Train / valid / test pairs of a translation corpus."""
    if config.corpus == "numbers":
        pairs = number_pairs(
            config.num_examples, config.language, seed=config.seed, max_value=config.max_value
        )
        return split_pairs(pairs, config.valid_fraction, config.test_fraction, seed=config.seed)
    if config.corpus == "bible":
        return bible_pairs(config.source_bible, config.target_bible, db_path=config.bible_db)
    raise ValueError(f"data.corpus={config.corpus!r} is not a translation corpus")


def text_stream(config: DataConfig) -> Split[str]:
    """Train / valid / test text of a language-model corpus (contiguous split)."""
    if config.corpus != "shakespeare":
        raise ValueError(f"data.corpus={config.corpus!r} is not a language-model corpus")
    if config.text_file is not None and not config.text_file.endswith(".tar.gz"):
        path = Path(config.text_file)
        if not path.is_file():
            raise FileNotFoundError(f"data.text_file: no file {path}")
        text = path.read_text(encoding="utf-8")
    else:
        text = shakespeare_text(config.text_file)
    return split_text(text, config.valid_fraction, config.test_fraction)


def train_tokenizer(config: DataConfig, texts: list[str], directory: Path) -> Tokenizer:
    """A tokenizer of ``config.tokenizer`` kind fitted to ``texts``, saved to ``directory``."""
    tokenizer: Tokenizer
    if config.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    elif config.tokenizer == "char":
        tokenizer = CharTokenizer.train(texts)
    else:
        tokenizer = SentencePieceTokenizer.train(
            texts, config.sentencepiece_vocab_size, model_type=config.sentencepiece_model
        )
    tokenizer.save(directory)
    return tokenizer


def tokenizers(
    config: DataConfig, workdir: Path, sources: list[str] | None, targets: list[str], shared: bool
) -> tuple[Tokenizer | None, Tokenizer]:
    """``(source, target)`` tokenizers of a run: loaded from ``workdir`` if present, else trained.

    ``sources=None`` (a language model) gives no source tokenizer; ``shared`` fits one tokenizer to
    both sides (needed by ``share_embeddings``) and stores it as both.
    """
    root = workdir / "tokenizers"
    if (root / "target").is_dir():
        source = load_tokenizer(root / "source") if sources is not None else None
        return source, load_tokenizer(root / "target")
    if sources is None:
        return None, train_tokenizer(config, targets, root / "target")
    if shared:
        tokenizer = train_tokenizer(config, sources + targets, root / "target")
        tokenizer.save(root / "source")
        return tokenizer, tokenizer
    return (
        train_tokenizer(config, sources, root / "source"),
        train_tokenizer(config, targets, root / "target"),
    )


def load_tokenizers(workdir: Path, task: str) -> tuple[Tokenizer | None, Tokenizer]:
    root = Path(workdir) / "tokenizers"
    if not (root / "target").is_dir():
        raise FileNotFoundError(f"{workdir} holds no tokenizers: is it a jaxformer workdir?")
    source = load_tokenizer(root / "source") if task == "translate" else None
    return source, load_tokenizer(root / "target")


def token_pairs(
    pairs: list[Pair], source: Tokenizer, target: Tokenizer
) -> list[tuple[list[int], list[int]]]:
    sources = encode_all(source, [s for s, _ in pairs])
    targets = encode_all(target, [t for _, t in pairs])
    return list(zip(sources, targets, strict=True))


def batch_config(config: DataConfig, batch_size: int, train: bool) -> BatchConfig:
    """Length buckets every ``LENGTH_STEP`` tokens; training drops examples over ``max_length``
    (counted and reported) and fills no partial batch; evaluation keeps every example or fails."""
    return BatchConfig(
        batch_size=batch_size,
        buckets=Buckets.multiples(LENGTH_STEP, config.max_length),
        max_length=config.max_length,
        too_long="drop" if train else "error",
        empty="drop" if train else "error",
        vocab_size=None,  # ids come from our own tokenizers
        drop_remainder=train,
    )


def as_arrays(batch: Batch) -> dict[str, np.ndarray]:
    return {"src": batch.src, "tgt_in": batch.tgt_in, "tgt_out": batch.tgt_out}


@dataclasses.dataclass
class EpochBatches:
    """Training batches of a fixed example set, reshuffled per epoch, addressable by step.

    Every epoch holds the same number of batches (same buckets, full batches only), so the batch
    of step ``s`` is a pure function of ``s`` and the seed: a resumed run sees the very batches the
    uninterrupted run would have seen.
    """

    make_epoch: Callable[[int], list[dict[str, np.ndarray]]]  # seed -> the batches of an epoch
    seed: int
    stats: BatchStats | None = None  # what batching kept and dropped (translation)
    _epoch: int = -1
    _batches: list[dict[str, np.ndarray]] | None = None

    def __post_init__(self):
        self.per_epoch = len(self._load(0))
        if self.per_epoch == 0:
            raise ValueError("the training split makes no full batch: lower run.batch_size")

    def _load(self, epoch: int) -> list:
        if epoch != self._epoch:
            self._batches, self._epoch = self.make_epoch(self.seed + epoch), epoch
        assert self._batches is not None
        return self._batches

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, self.per_epoch)
        return self._load(epoch)[index]


def translation_batches(
    pairs: list[tuple[list[int], list[int]]], config: DataConfig, batch_size: int
) -> EpochBatches:
    settings = batch_config(config, batch_size, train=True)

    def make_epoch(seed: int):
        batches, _ = bucket_batches(pairs, settings, seed=seed)
        return [as_arrays(b) for b in batches]

    _, stats = bucket_batches(pairs, settings, seed=None)
    return EpochBatches(make_epoch, config.seed, stats)


def lm_batches(ids: list[int], config: DataConfig, batch_size: int) -> EpochBatches:
    def make_epoch(seed: int):
        windows = lm_windows(ids, config.max_length, batch_size, seed=seed)
        return [{"ids": w[:, :-1], "targets": w[:, 1:]} for w in windows]

    return EpochBatches(make_epoch, config.seed)
