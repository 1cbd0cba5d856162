"""``jaxformer train`` and ``jaxformer export``: make a run, and write it for another engine."""

from __future__ import annotations

import json
from pathlib import Path

from jaxformer.cli.common import UsageError, load_run, note


def cmd_train(args) -> int:
    from jaxformer.training.experiment import load_config, override
    from jaxformer.training.fit import TrainingInterrupted, fit

    path, _, variant = args.config.partition(":")
    config = override(load_config(path, variant or "default"), args.set or [])
    try:
        summary = fit(config, args.workdir)
    except TrainingInterrupted:  # fit printed the step it saved; 130: ended by SIGINT
        return 130
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export(args) -> int:
    """Writes the run as a CTranslate2 model directory; never deletes what it did not write:
    ``--out`` must be new or empty, or (``--overwrite``) hold an earlier export only."""
    try:
        from jaxformer.interop import ctranslate2 as ct2
    except ImportError as error:
        raise UsageError(f"CTranslate2 export is unavailable: {error}") from error
    out = Path(args.out)
    try:
        replaced = ct2.previous_export(out, args.overwrite)
    except ValueError as error:
        message = str(error).replace("overwrite=True (--overwrite)", "--overwrite")
        raise UsageError(f"--out {message}") from None
    run = load_run(args, "translate")
    path = ct2.to_ctranslate2(
        run.config.model,
        run.params,
        out,
        source_vocab=vocabulary(run.source_tokenizer),
        target_vocab=vocabulary(run.target_tokenizer),
        quantization=args.quantization,
        overwrite=args.overwrite,
    )
    if replaced:
        note(f"--overwrite: replaced the earlier export in {out} ({', '.join(replaced)})")
    print(path)
    return 0


def vocabulary(tokenizer) -> list[str]:
    """One distinct token string per id: OpenNMT's ``<blank> <s> </s> <unk>`` for ids 0-3, then
    the characters (char), the sentencepiece pieces, or ``<0xNN>`` (byte)."""
    specials = ["<blank>", "<s>", "</s>", "<unk>"]
    size = tokenizer.vocab_size
    if tokenizer.kind == "char":
        return specials + list(tokenizer.chars)
    if tokenizer.kind == "sentencepiece":
        return specials + [tokenizer._processor.id_to_piece(i) for i in range(4, size)]
    return specials + [f"<0x{i - 4:02X}>" for i in range(4, size)]
