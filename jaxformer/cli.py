"""The ``jaxformer`` command: train, translate, generate, eval, export.

    jaxformer train --config experiments/configs/num2words.py:demo --workdir runs/demo \\
        --set run.train_steps=3000 --set model.d_model=128
    echo 60051 | jaxformer translate --workdir runs/demo --beam-size 4
    jaxformer eval --workdir runs/demo --split test --beam-size 4
    jaxformer eval --workdir runs/demo --source src.txt --reference ref.txt --beam-size 4
    jaxformer generate --workdir runs/shakespeare --prompt "ROMEO." --sampling-topk 10
    jaxformer export ctranslate2 --workdir runs/demo --out runs/demo/ct2

Bad input (a missing workdir or checkpoint, a checkpoint of another model, an unknown ``--set`` key,
an invalid option value, an input line longer than the model's maximum) ends with a one-line
``jaxformer: error: ...`` on stderr and exit status 2, never a traceback or a wrong answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxformer.data.corpora import MissingDependency


class UsageError(ValueError):
    pass


def _config_path(text: str) -> tuple[str, str]:
    path, _, variant = text.partition(":")
    return path, variant or "default"


def cmd_train(args) -> int:
    from jaxformer.training.experiment import load_config, override
    from jaxformer.training.fit import fit

    path, variant = _config_path(args.config)
    config = override(load_config(path, variant), args.set or [])
    summary = fit(config, args.workdir)
    print(json.dumps(summary, indent=2))
    return 0


def _decode_options(args):
    from jaxformer.decoding.texts import DecodeOptions

    return DecodeOptions(
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        coverage_penalty=args.coverage_penalty,
        sampling_topk=args.sampling_topk,
        sampling_temperature=args.sampling_temperature,
        min_length=args.min_length,
        max_length=args.max_length,
        n_best=args.n_best,
        seed=args.seed,
    )


def _read_lines(path: str | None) -> list[str]:
    if path is None or path == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--input {path}: cannot read it ({error})") from error


def _load(args, task: str | None):
    """The run in ``--workdir`` at ``--checkpoint``; ``task`` (if given) must be its task."""
    from jaxformer.training.fit import load_run

    step = args.checkpoint if args.checkpoint in ("best", "latest") else _int(args.checkpoint)
    run = load_run(args.workdir, step)
    if task is not None and run.config.task != task:
        raise UsageError(
            f"--workdir {args.workdir} holds a {run.config.task!r} model; "
            f"use `jaxformer {'translate' if run.config.task == 'translate' else 'generate'}`"
        )
    return run


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--checkpoint must be 'best', 'latest' or a step, got {text!r}") from None


def _write(outputs, n_best: int, with_scores: bool, out) -> None:
    for output in outputs:
        for text, score in zip(output.texts[:n_best], output.scores[:n_best], strict=True):
            out.write(f"{score:.6f} ||| {text}\n" if with_scores else f"{text}\n")


def cmd_translate(args) -> int:
    from jaxformer.decoding.texts import translate_texts

    options = _decode_options(args)
    run = _load(args, "translate")
    lines = _read_lines(args.input)
    outputs = translate_texts(
        run.model,
        run.params,
        run.source_tokenizer,
        run.target_tokenizer,
        lines,
        options,
        batch_size=args.batch_size,
        truncate=args.truncate,
        progress=len(lines) >= 64,
    )
    truncated = sum(o.truncated for o in outputs)
    if truncated:
        print(
            f"jaxformer: warning: {truncated} translation(s) reached --max-length "
            f"{options.max_length} without an end token",
            file=sys.stderr,
        )
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")
    try:
        _write(outputs, options.n_best, args.with_scores, out)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_generate(args) -> int:
    from jaxformer.decoding.texts import continue_texts

    options = _decode_options(args)
    run = _load(args, "lm")
    prompts = args.prompt or _read_lines(args.input)
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT or lines on stdin / --input")
    outputs = continue_texts(run.model, run.params, run.target_tokenizer, prompts, options)
    for prompt, output in zip(prompts, outputs, strict=True):
        for text in output.texts[: options.n_best]:
            print(prompt + text)
    return 0


def cmd_eval(args) -> int:
    from jaxformer.decoding.texts import corpus_scores, translate_texts
    from jaxformer.training.fit import evaluate_run, prepare

    options = _decode_options(args)
    if (args.source is None) != (args.reference is None):
        raise UsageError("--source and --reference go together (your own test set)")
    run = _load(args, task="translate" if args.source else None)
    if args.source is not None:
        sources, references = _read_lines(args.source), _read_lines(args.reference)
        if len(sources) != len(references):
            raise UsageError(
                f"--source has {len(sources)} lines but --reference has {len(references)}"
            )
        outputs = translate_texts(
            run.model,
            run.params,
            run.source_tokenizer,
            run.target_tokenizer,
            sources,
            options,
            batch_size=args.batch_size,
            truncate=args.truncate,
            progress=len(sources) >= 64,
        )
        metrics = corpus_scores([o.texts[0] for o in outputs], references)
        where = {"source": args.source, "reference": args.reference, "lines": len(sources)}
    else:
        _, data = prepare(run.config, Path(args.workdir))
        metrics = evaluate_run(
            run.config, run.model, run.params, data, split=args.split, options=options
        )
        where = {"split": args.split}
    print(json.dumps({"workdir": args.workdir, "step": run.step} | where | metrics))
    return 0


def cmd_export(args) -> int:
    if args.format != "ctranslate2":
        raise UsageError(f"export format must be 'ctranslate2', got {args.format!r}")
    try:
        from jaxformer.interop import to_ctranslate2
    except ImportError as error:
        raise UsageError(f"CTranslate2 export is unavailable: {error}") from error
    run = _load(args, "translate")
    path = to_ctranslate2(
        run.config.model,
        run.params,
        args.out,
        source_vocab=_vocab(run.source_tokenizer),
        target_vocab=_vocab(run.target_tokenizer),
        quantization=args.quantization,
    )
    print(path)
    return 0


def _vocab(tokenizer) -> list[str]:
    """One distinct token string per id: OpenNMT's ``<blank> <s> </s> <unk>`` for ids 0-3, then
    the characters (char), the sentencepiece pieces, or ``<0xNN>`` (byte)."""
    specials = ["<blank>", "<s>", "</s>", "<unk>"]
    size = tokenizer.vocab_size
    if tokenizer.kind == "char":
        return specials + list(tokenizer.chars)
    if tokenizer.kind == "sentencepiece":
        return specials + [tokenizer._processor.id_to_piece(i) for i in range(4, size)]
    return specials + [f"<0x{i - 4:02X}>" for i in range(4, size)]


def _add_decode_options(parser: argparse.ArgumentParser, max_length: int) -> None:
    group = parser.add_argument_group("search")
    group.add_argument("--beam-size", type=int, default=1, help="1: greedy (default)")
    group.add_argument("--length-penalty", type=float, default=0.0, help="GNMT alpha")
    group.add_argument("--coverage-penalty", type=float, default=0.0, help="GNMT beta")
    group.add_argument(
        "--sampling-topk", type=int, default=1, help="1: no sampling; 0: full vocabulary; k: top k"
    )
    group.add_argument("--sampling-temperature", type=float, default=1.0)
    group.add_argument("--min-length", type=int, default=0)
    group.add_argument("--max-length", type=int, default=max_length)
    group.add_argument("--n-best", type=int, default=1, help="hypotheses per input (<= beam)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed")


def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="a directory `jaxformer train` wrote")
    parser.add_argument(
        "--checkpoint", default="best", help="'best' (by validation loss), 'latest' or a step"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxformer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a run")
    train.add_argument("--config", required=True, help="experiments/configs/NAME.py[:variant]")
    train.add_argument("--workdir", required=True)
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    train.set_defaults(func=cmd_train)

    translate = sub.add_parser("translate", help="translate lines from stdin or --input")
    _add_run(translate)
    translate.add_argument("--input", help="a text file, one source per line (default: stdin)")
    translate.add_argument("--output", help="default: stdout")
    translate.add_argument("--batch-size", type=int, default=32)
    translate.add_argument(
        "--truncate",
        action="store_true",
        help="keep the first tokens of lines longer than the model's maximum (default: error)",
    )
    translate.add_argument("--with-scores", action="store_true", help="print 'score ||| text'")
    _add_decode_options(translate, max_length=250)
    translate.set_defaults(func=cmd_translate)

    generate = sub.add_parser("generate", help="continue prompts with a language model")
    _add_run(generate)
    generate.add_argument("--prompt", action="append", help="repeatable; default: stdin lines")
    generate.add_argument("--input", help="prompts, one per line")
    _add_decode_options(generate, max_length=200)
    generate.set_defaults(func=cmd_generate)

    evaluate = sub.add_parser(
        "eval", help="held-out loss/perplexity (+ BLEU, exact match), or BLEU of your own test set"
    )
    _add_run(evaluate)
    evaluate.add_argument("--split", choices=("valid", "test"), default="test")
    evaluate.add_argument("--source", help="your own test set: source lines (with --reference)")
    evaluate.add_argument("--reference", help="reference translations, one per source line")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--truncate", action="store_true")
    _add_decode_options(evaluate, max_length=250)
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", help="write the model for another engine")
    export.add_argument("format", help="ctranslate2")
    _add_run(export)
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--quantization", default=None, help="e.g. int8 (CTranslate2's names)")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, MissingDependency) as error:
        message = str(error).strip() or type(error).__name__
        print(f"jaxformer: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
