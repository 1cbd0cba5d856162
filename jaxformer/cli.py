"""The jaxformer command: train, translate, generate, eval, export.

examples:
    jaxformer train --config experiments/configs/num2words.py:demo --workdir runs/demo \\
        --set run.train_steps=3000 --set model.d_model=128 --set run.progress=false
    echo 60051 | jaxformer translate --workdir runs/demo --beam-size 4
    jaxformer translate --workdir runs/demo --input numbers.txt --output out/words.txt
    jaxformer translate --model opus-mt-en-de --beam-size 4 < english.txt
    jaxformer translate --model nllb-200-distilled-600M --source-lang eng_Latn --target-lang fra_Latn
    jaxformer translate --model onmt-run/ --source-vocabulary src.txt --target-vocabulary tgt.txt \
        --model-type TransformerBase < tokenized.txt
    jaxformer eval --workdir runs/demo --split test --beam-size 4 --limit 200
    jaxformer eval --workdir runs/demo --source src.txt --reference ref.txt --beam-size 4
    jaxformer generate --workdir runs/shakespeare --prompt "ROMEO." --sampling-topk 10
    jaxformer export ctranslate2 --workdir runs/demo --out runs/demo/ct2

`jaxformer COMMAND --help` lists a command's options and their defaults. Bad input (a missing
workdir or checkpoint, a checkpoint of another model, an unknown --set key, an invalid option value,
input that is not UTF-8, an input line longer than the model's maximum) ends with a one-line
`jaxformer: error: ...` on stderr and exit status 2, never a traceback or a wrong answer. Input
symbols outside the vocabulary are translated as <unk>, with a warning on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxformer.data.corpora import MissingDependency
from jaxformer.decoding.options import require_int
from jaxformer.training.heldout import held_out_batches, held_out_text

EXPORT_FORMATS = ("ctranslate2",)


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``jaxformer: error: ...`` line (see ``main``)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except for flags (off) and options whose help says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxformer")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _config_path(text: str) -> tuple[str, str]:
    path, _, variant = text.partition(":")
    return path, variant or "default"


def cmd_train(args) -> int:
    from jaxformer.training.experiment import load_config, override
    from jaxformer.training.fit import TrainingInterrupted, fit

    path, variant = _config_path(args.config)
    config = override(load_config(path, variant), args.set or [])
    try:
        summary = fit(config, args.workdir)
    except TrainingInterrupted:  # fit printed the step it saved; 130: ended by SIGINT
        return 130
    print(json.dumps(summary, indent=2))
    return 0


def _default_max_length(run, prompt_tokens: int = 0) -> int:
    """The run's stored decode length (``run.decode_max_length``), capped by what the model's
    ``max_len`` leaves after a prompt of ``prompt_tokens`` (decoder-only LMs); the model's limit if
    the run stores none."""
    limit = run.config.model.max_len - max(prompt_tokens - 1, 0)
    stored = getattr(run.config.run, "decode_max_length", None)
    if limit < 1:
        raise UsageError(
            f"a prompt of {prompt_tokens} tokens leaves no room in the model's "
            f"max_len={run.config.model.max_len}"
        )
    return min(stored, limit) if stored else limit


def _load_pretrained(args):
    """``--model DIR`` with the hints given on the command line (OpenNMT-tf needs some)."""
    from jaxformer.interop import load_pretrained

    names = {
        "source_vocabulary": "source_vocabulary",
        "target_vocabulary": "target_vocabulary",
        "num_heads": "num_heads",
        "model_type": "model",
        "positions": "positions",
        "dtype": "dtype",
    }
    hints = {h: getattr(args, a) for a, h in names.items() if getattr(args, a) is not None}
    if args.source_lang is not None and args.target_lang is None:
        raise UsageError("--source-lang needs --target-lang (the language forced first)")
    try:
        return load_pretrained(args.model, **hints)
    except TypeError as error:  # a hint this kind of checkpoint does not take
        raise UsageError(
            str(error).replace("_", "-").replace("load-pretrained", "--model")
        ) from None


def _decode_options(args, max_length: int | None, pre=None):
    from jaxformer.decoding.texts import DecodeOptions

    if pre is not None:  # the checkpoint's generation defaults, the command line's options
        chosen = _search_options(args)
        if args.max_length is not None:
            chosen["max_length"] = args.max_length
        return pre.decode_options(args.target_lang, **chosen)
    return DecodeOptions(
        max_length=max_length if args.max_length is None else args.max_length,
        **_search_options(args),
    )


def _search_options(args) -> dict:
    return dict(
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        coverage_penalty=args.coverage_penalty,
        sampling_topk=args.sampling_topk,
        sampling_temperature=args.sampling_temperature,
        min_length=args.min_length,
        n_best=args.n_best,
        seed=args.seed,
    )


def _check_at_least(args, name: str, low: int) -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"))
    if value is not None:
        try:
            require_int(name, value, low)
        except ValueError as error:
            raise UsageError(str(error)) from None


def _read_lines(path: str | None, option: str = "--input") -> list[str]:
    """The lines of ``path`` (``None`` or ``-``: stdin), which must be UTF-8: bytes that are not
    are an error naming where they are, from a file and from stdin alike."""
    if path is None or path == "-":
        where = "stdin"
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # a text stream without bytes underneath (tests, notebooks)
            text = sys.stdin.read()
            data = text.encode("utf-8", errors="surrogateescape")
        else:
            data = buffer.read()
    else:
        where = f"{option} {path}"
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise UsageError(f"{where}: cannot read it ({error})") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UsageError(
            f"{where}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
            "convert it first, e.g. with iconv -f LATIN1 -t UTF-8"
        ) from None
    return text.splitlines()


def _check_output(path: str | None) -> None:
    """Refuses an ``--output`` that cannot be written, before any work is done."""
    if path is None or path == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--output {path} is a directory; give a file name")
    if not target.parent.is_dir():
        raise UsageError(
            f"--output {path}: directory {target.parent} does not exist (create it first)"
        )


def _load(args, task: str | None):
    """The run in ``--workdir`` at ``--checkpoint``; ``task`` (if given) must be its task."""
    from jaxformer.training.runs import load_run

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


def _warn_unknown(args, outputs, what: str = "lines") -> None:
    from jaxformer.decoding.texts import unknown_summary

    message = unknown_summary(outputs, what)
    if message and not args.no_unk_warning:
        print(f"jaxformer: warning: {message}; --no-unk-warning hides this", file=sys.stderr)


def _warn_truncated(outputs, max_length: int) -> None:
    truncated = sum(o.truncated for o in outputs)
    if truncated:
        print(
            f"jaxformer: warning: {truncated} translation(s) reached --max-length "
            f"{max_length} without an end token",
            file=sys.stderr,
        )


def cmd_translate(args) -> int:
    from jaxformer.decoding.texts import translate_texts

    _check_at_least(args, "--batch-size", 1)
    _check_output(args.output)
    if args.model is not None:
        pre = _load_pretrained(args)
        for setting in pre.generation.ignored:  # generation_config.json settings not reproduced
            print(f"jaxformer: note: {pre.path.name}: not applied: {setting}", file=sys.stderr)
        options = _decode_options(args, None, pre)
        rows = args.batch_size * options.beam_size
        model, params = _quantized(pre.model, pre.params, args.quantization, rows)
        pre = dataclasses.replace(pre, model=model, params=params)
        lines = _read_lines(args.input)
        outputs = pre.translate(
            lines,
            options,
            source_lang=args.source_lang,
            batch_size=args.batch_size,
            truncate=args.truncate,
            progress=len(lines) >= 64,
        )
    else:
        run = _load(args, "translate")
        options = _decode_options(args, _default_max_length(run))
        rows = args.batch_size * options.beam_size
        model, params = _quantized(run.model, run.params, args.quantization, rows)
        lines = _read_lines(args.input)
        outputs = translate_texts(
            model,
            params,
            run.source_tokenizer,
            run.target_tokenizer,
            lines,
            options,
            batch_size=args.batch_size,
            truncate=args.truncate,
            progress=len(lines) >= 64,
        )
    _warn_unknown(args, outputs)
    _warn_truncated(outputs, options.max_length)
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")
    try:
        _write(outputs, options.n_best, args.with_scores, out)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _quantized(model, params, quantization: str | None, rows: int):
    """``(model, params)`` for ``--quantization``: the model built with its config's
    ``quantization``; with int8 and calls of at least ``MIN_ROWS`` rows (batch size x beam), where
    the products run in int8, the projection kernels stored in int8 once (``quantize_params``)
    instead of quantized inside every decode loop. Fewer rows keep float32 products and kernels."""
    from jaxformer.models.quantization import MIN_ROWS, quantize_params

    if quantization is None:
        return model, params
    config = model.config
    if not hasattr(config, "quantization"):
        raise UsageError(
            f"--quantization {quantization}: applies to Transformer and decoder-only models, "
            f"not to a {type(model).__name__}"
        )
    model = type(model)(dataclasses.replace(config, quantization=quantization))
    return model, (quantize_params(params) if rows >= MIN_ROWS else params)


def cmd_generate(args) -> int:
    from jaxformer.decoding.texts import continue_texts

    run = _load(args, "lm")
    prompts = args.prompt or _read_lines(args.input)
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT or lines on stdin / --input")
    longest = max(len(run.target_tokenizer.encode(p)) for p in prompts)
    options = _decode_options(args, _default_max_length(run, prompt_tokens=longest))
    rows = len(prompts) * options.beam_size
    model, params = _quantized(run.model, run.params, args.quantization, rows)
    outputs = continue_texts(model, params, run.target_tokenizer, prompts, options)
    _warn_unknown(args, outputs, "prompts")
    for prompt, output in zip(prompts, outputs, strict=True):
        for text in output.texts[: options.n_best]:
            print(prompt + text)
    return 0


def cmd_eval(args) -> int:
    from jaxformer.decoding.texts import corpus_scores, translate_texts

    _check_at_least(args, "--batch-size", 1)
    _check_at_least(args, "--limit", 1)
    if (args.source is None) != (args.reference is None):
        raise UsageError("--source and --reference go together (your own test set)")
    run = _load(args, task="translate" if args.source else None)
    options = _decode_options(args, _default_max_length(run))
    rows = args.batch_size * options.beam_size  # the held-out loss's full passes have more
    model, params = _quantized(run.model, run.params, args.quantization, rows)
    run = dataclasses.replace(run, model=model, params=params)
    if args.source is not None:
        sources = _read_lines(args.source, "--source")
        references = _read_lines(args.reference, "--reference")
        if len(sources) != len(references):
            raise UsageError(
                f"--source has {len(sources)} lines but --reference has {len(references)}"
            )
        sources, references = sources[: args.limit], references[: args.limit]
        outputs = translate_texts(
            run.model,
            run.params,
            run.source_tokenizer,
            run.target_tokenizer,
            sources,
            options,
            batch_size=args.batch_size,
            truncate=args.truncate,
            progress=True,
        )
        _warn_unknown(args, outputs)
        _warn_truncated(outputs, options.max_length)
        metrics = corpus_scores([o.texts[0] for o in outputs], references)
        where = {"source": args.source, "reference": args.reference, "lines": len(sources)}
    else:
        metrics, examples = _evaluate_split(run, Path(args.workdir), args, options)
        where = {"split": args.split, "examples": examples}
    print(json.dumps({"workdir": args.workdir, "step": run.step} | where | metrics))
    return 0


# --- eval on a held-out split ----------------------------------------------------------------------


def _evaluate_split(run, workdir: Path, args, options) -> tuple[dict, int]:
    """Held-out loss, perplexity, bits per token, token accuracy; for translation, BLEU and exact
    match of ``options`` too (with a progress bar). ``--limit N``: the first N pairs (translation)
    or tokens (LM) of the split."""
    import math

    from jaxformer.decoding.texts import corpus_scores, translate_texts
    from jaxformer.training.step import evaluate, make_eval_step

    config = run.config
    held = held_out_text(config, workdir, args.split)
    if config.task == "translate":
        held = held[: args.limit]
        examples = len(held)
        if not held:
            raise UsageError(f"the {args.split} split is empty")
    else:
        held = run.target_tokenizer.encode(held)[: args.limit]
        examples = len(held)
    batches = held_out_batches(config, run.source_tokenizer, run.target_tokenizer, held)
    out = evaluate(make_eval_step(run.model), run.params, batches)
    metrics = {k: out[k] for k in ("loss", "perplexity", "accuracy")}
    metrics["bits_per_token"] = out["loss"] / math.log(2)
    if config.task == "translate":
        outputs = translate_texts(
            run.model,
            run.params,
            run.source_tokenizer,
            run.target_tokenizer,
            [s for s, _ in held],
            options,
            batch_size=args.batch_size,
            truncate=True,
            progress=True,
        )
        _warn_unknown(args, outputs, "pairs")
        metrics |= corpus_scores([o.texts[0] for o in outputs], [t for _, t in held])
    return metrics, examples


# --- export ----------------------------------------------------------------------------------------


def cmd_export(args) -> int:
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


# --- the parser ------------------------------------------------------------------------------------


def _add_decode_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("search")
    group.add_argument("--beam-size", type=int, default=1, help="1: greedy search")
    group.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="GNMT length penalty alpha (beam search)",
    )
    group.add_argument(
        "--coverage-penalty", type=float, default=0.0, help="GNMT coverage penalty beta"
    )
    group.add_argument(
        "--sampling-topk", type=int, default=1, help="1: no sampling; 0: full vocabulary; k: top k"
    )
    group.add_argument(
        "--sampling-temperature", type=float, default=1.0, help="softmax temperature of sampling"
    )
    group.add_argument(
        "--min-length", type=int, default=0, help="no end token before this many tokens"
    )
    group.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="most tokens per output (default: the run's run.decode_max_length, at most what the "
        "model's max_len allows)",
    )
    group.add_argument("--n-best", type=int, default=1, help="hypotheses per input (<= beam)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed")


def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="a directory `jaxformer train` wrote")
    parser.add_argument(
        "--checkpoint", default="best", help="'best' (by validation loss), 'latest' or a step"
    )


def _add_unk_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-unk-warning",
        action="store_true",
        help="do not warn about input symbols outside the vocabulary (they become <unk>)",
    )


def _add_train(command) -> None:
    train = command("train", "train (or resume) a run")
    train.add_argument("--config", required=True, help="experiments/configs/NAME.py[:variant]")
    train.add_argument("--workdir", required=True, help="where the run is written (or resumed)")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. run.train_steps=200 or run.progress=false "
        "(repeatable; default: the config's values)",
    )
    train.set_defaults(func=cmd_train)


def _add_translate(command) -> None:
    translate = command("translate", "translate lines from stdin or --input")
    which = translate.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", help="a directory `jaxformer train` wrote (or --model)")
    which.add_argument(
        "--model",
        help="a Hugging Face model directory (config.json + *.safetensors: Marian, NLLB/M2M100, "
        "BART, mBART, T5, mT5) or an OpenNMT-tf checkpoint (directory or prefix) (or --workdir)",
    )
    translate.add_argument(
        "--checkpoint",
        default="best",
        help="with --workdir: 'best', 'latest' or a step (default: best)",
    )
    _add_pretrained_options(translate)
    translate.add_argument(
        "--input", help="a UTF-8 text file, one source per line (default: stdin)"
    )
    translate.add_argument(
        "--output", help="a file to write (its directory must exist; default: stdout)"
    )
    translate.add_argument(
        "--batch-size", type=int, default=32, help="lines decoded together (>= 1)"
    )
    translate.add_argument(
        "--truncate",
        action="store_true",
        help="keep the first tokens of lines longer than the model's maximum (default: error)",
    )
    translate.add_argument("--with-scores", action="store_true", help="print 'score ||| text'")
    _add_quantization_option(translate)
    _add_unk_option(translate)
    _add_decode_options(translate)
    translate.set_defaults(func=cmd_translate)


def _add_quantization_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantization",
        choices=["int8"],
        default=None,
        help="int8: the projections' products in int8, as CTranslate2's int8 (products of "
        "batches under 16 rows stay float32; default: float32 products)",
    )


def _add_pretrained_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--model (imported checkpoints)")
    group.add_argument(
        "--source-lang", help="NLLB / M2M100 source language, e.g. eng_Latn (default: none)"
    )
    group.add_argument(
        "--target-lang",
        help="NLLB / M2M100 target language, e.g. fra_Latn (default: the checkpoint's forced "
        "first token, if any)",
    )
    group.add_argument(
        "--source-vocabulary", help="OpenNMT-tf: the source vocabulary file (default: none)"
    )
    group.add_argument(
        "--target-vocabulary", help="OpenNMT-tf: the target vocabulary file (default: none)"
    )
    group.add_argument(
        "--num-heads",
        type=int,
        help="OpenNMT-tf: heads, not stored in checkpoints (default: from --model-type or the "
        "relative position tables)",
    )
    group.add_argument(
        "--model-type",
        help="OpenNMT-tf: the catalog model, e.g. TransformerBase, which sets the heads "
        "(default: none)",
    )
    group.add_argument(
        "--positions",
        choices=("sinusoidal", "none"),
        help="OpenNMT-tf with relative positions: whether sinusoids are on too (default: "
        "sinusoidal without relative positions, required with them)",
    )
    group.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="activations' dtype; parameters stay float32 (default: float32)",
    )


def _add_generate(command) -> None:
    generate = command("generate", "continue prompts with a language model")
    _add_run(generate)
    generate.add_argument("--prompt", action="append", help="repeatable (default: stdin lines)")
    generate.add_argument("--input", help="prompts, one per line (default: stdin)")
    _add_quantization_option(generate)
    _add_unk_option(generate)
    _add_decode_options(generate)
    generate.set_defaults(func=cmd_generate)


def _add_eval(command) -> None:
    evaluate = command(
        "eval",
        "held-out loss/perplexity (+ BLEU, exact match), or BLEU of your own test set",
    )
    _add_run(evaluate)
    evaluate.add_argument(
        "--split",
        choices=("valid", "test"),
        default="test",
        help="held-out split of the run's corpus (cached in WORKDIR/heldout.json)",
    )
    evaluate.add_argument(
        "--source",
        help="your own test set: source lines, with --reference (default: the --split)",
    )
    evaluate.add_argument(
        "--reference", help="reference translations, one per --source line (default: none)"
    )
    evaluate.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only the first N pairs (translation) or tokens (language model) (default: all)",
    )
    evaluate.add_argument(
        "--batch-size", type=int, default=32, help="lines decoded together (>= 1)"
    )
    evaluate.add_argument("--truncate", action="store_true", help="as translate --truncate")
    _add_quantization_option(evaluate)
    _add_unk_option(evaluate)
    _add_decode_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)


def _add_export(command) -> None:
    export = command(
        "export",
        "write the model for another engine",
        "write the model for another engine (README.md, 'Export to CTranslate2', shows how to "
        "use it)",
    )
    export.add_argument("format", choices=EXPORT_FORMATS, help="the engine")
    _add_run(export)
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument(
        "--quantization", default=None, help="e.g. int8, CTranslate2's names (default: float32)"
    )
    export.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    summary, _, epilog = __doc__.partition("\n\n")
    parser = _Parser(
        prog="jaxformer", description=summary, epilog=epilog, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"jaxformer {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None):
        return sub.add_parser(
            name, help=help, description=description or help, formatter_class=_HelpFormatter
        )

    for add in (_add_train, _add_translate, _add_generate, _add_eval, _add_export):
        add(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, FileNotFoundError, MissingDependency) as error:
        message = str(error).strip() or type(error).__name__
        print(f"jaxformer: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or outside it (fit saves and says so)
        print("jaxformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
