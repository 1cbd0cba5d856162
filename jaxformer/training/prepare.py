"""What a run reads before training: the corpus, its tokenizers and the batches of every step.

``prepare(config, workdir)`` loads the corpus named by ``config.data``, fits the tokenizers on the
training split (or reloads those the workdir holds), fills the vocabulary sizes into the model's
config, and returns the training batches (a function of the step: see ``datasets.EpochBatches``)
and the held-out sets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxformer.data import datasets
from jaxformer.training.experiment import ExperimentConfig
from jaxformer.training.heldout import held_out_batches


@dataclasses.dataclass
class Data:
    """Everything ``fit`` reads: tokenizers, the batches of each step, held-out sets."""

    source_tokenizer: Any
    target_tokenizer: Any
    train: datasets.EpochBatches
    valid_batches: list[dict[str, np.ndarray]]
    valid_pairs: list[tuple[str, str]]  # translation: decoded for BLEU / exact match
    test_pairs: list[tuple[str, str]]
    test_batches: list[dict[str, np.ndarray]]


def prepare(config: ExperimentConfig, workdir: Path) -> tuple[ExperimentConfig, Data]:
    """Loads the corpus, fits (or reloads) tokenizers, sets the vocabulary sizes in the config."""
    if config.task == "translate":
        return _prepare_translation(config, workdir)
    return _prepare_lm(config, workdir)


def _prepare_translation(config: ExperimentConfig, workdir: Path) -> tuple[ExperimentConfig, Data]:
    data, run = config.data, config.run
    split = datasets.text_pairs(data)
    src_tok, tgt_tok = datasets.tokenizers(
        data,
        workdir,
        [s for s, _ in split.train],
        [t for _, t in split.train],
        shared=config.model.share_embeddings,
    )
    assert src_tok is not None
    model = config.model.replace(vocab_size=tgt_tok.vocab_size, src_vocab_size=src_tok.vocab_size)
    # Held-out examples over the length limit are left out of the loss (and counted in the
    # summary), never truncated; BLEU / exact match decode every held-out example.
    held_out = lambda pairs: held_out_batches(config, src_tok, tgt_tok, pairs)
    train_ids = datasets.token_pairs(split.train, src_tok, tgt_tok)
    return config.replace(model=model), Data(
        src_tok,
        tgt_tok,
        datasets.translation_batches(train_ids, data, run.batch_size),
        held_out(split.valid),
        split.valid,
        split.test,
        held_out(split.test),
    )


def _prepare_lm(config: ExperimentConfig, workdir: Path) -> tuple[ExperimentConfig, Data]:
    data, run = config.data, config.run
    split_text = datasets.text_stream(data)
    _, tok = datasets.tokenizers(data, workdir, None, [split_text.train], shared=False)
    model = config.model.replace(vocab_size=tok.vocab_size, src_vocab_size=None)

    windows = lambda text: held_out_batches(config, None, tok, tok.encode(text))

    return config.replace(model=model), Data(
        None,
        tok,
        datasets.lm_batches(tok.encode(split_text.train), data, run.batch_size),
        windows(split_text.valid),
        [],
        [],
        windows(split_text.test),
    )
