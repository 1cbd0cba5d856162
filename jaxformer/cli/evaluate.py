"""``jaxformer eval``: a run's held-out split, or anyone's parallel files, scored.

- ``--workdir RUN [--split test]``: loss, perplexity, bits per token, token accuracy of the run's
  held-out split; for translation also BLEU, chrF and exact match of the search's outputs.
- ``--workdir RUN`` or ``--model DIR`` with ``--source F --reference F``: BLEU, chrF and exact match
  (sacrebleu) of the translations of your own test set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from jaxformer.cli import search
from jaxformer.cli.common import (
    MODEL_ONLY,
    UsageError,
    check_at_least,
    default_max_length,
    load_pretrained,
    load_run,
    note,
    refuse_unless,
    warn,
)
from jaxformer.cli.decode import quantized
from jaxformer.cli.files import read_lines
from jaxformer.training.heldout import held_out_batches, held_out_text


def cmd_eval(args) -> int:
    from jaxformer.decoding.texts import corpus_scores

    check_at_least(args, "--batch-size", 1)
    check_at_least(args, "--limit", 1)
    if (args.source is None) != (args.reference is None):
        raise UsageError("--source and --reference go together (your own test set)")
    if args.model is not None and args.source is None:
        raise UsageError("--model needs --source F --reference F (a held-out split is a run's)")
    refuse_unless(args, args.source is None, ("--split",), "to a run's held-out split only")
    if args.source is not None:
        sources, references = _test_set(args)
        translate, options, where = _translator(args)
        outputs = translate(sources)
        _warn(args, outputs, options)
        metrics = corpus_scores([o.texts[0] for o in outputs], references)
        where |= {"source": args.source, "reference": args.reference, "lines": len(sources)}
    else:
        refuse_unless(args, False, MODEL_ONLY, "to --model (imported checkpoints) only")
        run = load_run(args, None)
        onmt = search.read_onmt(args)
        options = search.decode_options(args, max_length=default_max_length(run), onmt=onmt)
        run = _quantized_run(run, args, search.batch_size(args, onmt) * options.beam_size)
        metrics, examples = _evaluate_split(run, Path(args.workdir), args, options, onmt)
        where = {"workdir": args.workdir, "step": run.step, "split": args.split or "test"}
        where["examples"] = examples
    print(json.dumps(where | metrics))
    return 0


def _test_set(args) -> tuple[list[str], list[str]]:
    sources = read_lines(args.source, "--source")
    references = read_lines(args.reference, "--reference")
    if len(sources) != len(references):
        raise UsageError(f"--source has {len(sources)} lines but --reference has {len(references)}")
    return sources[: args.limit], references[: args.limit]


def _translator(args):
    """``(translate(lines) -> outputs, options, {what was evaluated})`` for --model or --workdir."""
    import dataclasses

    from jaxformer.decoding.texts import translate_texts

    onmt = search.read_onmt(args, args.model)
    size = search.batch_size(args, onmt)
    prefix = args.source_prefix or ""
    if args.model is not None:
        pre = load_pretrained(args, onmt)
        options = search.decode_options(args, pre=pre, onmt=onmt, tokenizer=pre.target_tokenizer)
        model, params = quantized(
            pre.model, pre.params, args.quantization, size * options.beam_size
        )
        pre = dataclasses.replace(pre, model=model, params=params)
        for setting in pre.generation.ignored:
            note(f"{pre.path.name}: not applied: {setting}")
        if args.source_prefix is None and pre.wants_prefix:
            warn(pre.prefix_warning().replace("source_prefix= / ", ""))
        translate = lambda lines: pre.translate(
            lines, options, source_lang=args.source_lang, target_lang=args.target_lang,
            batch_size=size, truncate=args.truncate, progress=True, source_prefix=prefix,
        )  # fmt: skip
        return translate, options, {"model": args.model}
    refuse_unless(args, False, MODEL_ONLY, "to --model (imported checkpoints) only")
    run = load_run(args, "translate")
    options = search.decode_options(
        args, max_length=default_max_length(run), onmt=onmt, tokenizer=run.target_tokenizer
    )
    run = _quantized_run(run, args, size * options.beam_size)
    translate = lambda lines: translate_texts(
        run.model, run.params, run.source_tokenizer, run.target_tokenizer, lines, options,
        batch_size=size, truncate=args.truncate, progress=True, source_prefix=prefix,
    )  # fmt: skip
    return translate, options, {"workdir": args.workdir, "step": run.step}


def _quantized_run(run, args, rows: int):
    import dataclasses

    model, params = quantized(run.model, run.params, args.quantization, rows)
    return dataclasses.replace(run, model=model, params=params)


def _warn(args, outputs, options, what: str = "lines") -> None:
    from jaxformer.cli.decode import _warn as warn_outputs

    warn_outputs(args, outputs, options, what)


def _evaluate_split(run, workdir: Path, args, options, onmt) -> tuple[dict, int]:
    """Held-out loss, perplexity, bits per token, token accuracy; for translation, BLEU, chrF and
    exact match of ``options`` too (with a progress bar). ``--limit N``: the first N pairs
    (translation) or tokens (LM) of the split."""
    from jaxformer.decoding.texts import corpus_scores, translate_texts
    from jaxformer.training.step import evaluate, make_eval_step

    config, split = run.config, args.split or "test"
    held = held_out_text(config, workdir, split)
    if config.task == "translate":
        held = held[: args.limit]
        if not held:
            raise UsageError(f"the {split} split is empty")
    else:
        held = run.target_tokenizer.encode(held)[: args.limit]
    batches = held_out_batches(config, run.source_tokenizer, run.target_tokenizer, held)
    out = evaluate(make_eval_step(run.model), run.params, batches)
    metrics = {k: out[k] for k in ("loss", "perplexity", "accuracy")}
    metrics["bits_per_token"] = out["loss"] / math.log(2)
    if config.task == "translate":
        outputs = translate_texts(
            run.model, run.params, run.source_tokenizer, run.target_tokenizer,
            [s for s, _ in held], options, batch_size=search.batch_size(args, onmt),
            truncate=True, progress=True,
        )  # fmt: skip
        _warn(args, outputs, options, "pairs")
        metrics |= corpus_scores([o.texts[0] for o in outputs], [t for _, t in held])
    return metrics, len(held)
