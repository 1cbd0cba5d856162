"""``jaxformer translate`` and ``jaxformer generate``: lines in, results out, each written as it comes.

Results are written in input order, each as soon as every earlier line's is (the decoders sort by
length within windows of lines, never over the whole file; with ``--engine`` the lines go one by
one through the serving engine, a finished line's slots taken by the next at once). Ctrl-C keeps
what was written, says how much, and exits 130; ``--resume`` continues after the lines an earlier run wrote to ``--output``.
"""

from __future__ import annotations

import dataclasses
import sys

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
from jaxformer.cli.files import Output, check_output, check_resumable, read_lines

PROGRESS_FROM = 64  # lines: a progress bar (stderr) for inputs at least this long


def cmd_translate(args) -> int:
    check_at_least(args, "--batch-size", 1)
    check_output(args.output, {"--input": args.input})
    lines = read_lines(args.input)
    if args.model is not None:
        translations, options = _imported(args, lines)
    else:
        translations, options = _trained(args, lines)
    return write_all(args, lines, translations, options)


def _imported(args, lines):
    """``--model DIR``: ``(make_outputs, options)`` with the checkpoint's tokenizers and defaults."""
    onmt = search.read_onmt(args, args.model)
    pre = load_pretrained(args, onmt)
    for setting in pre.generation.ignored:  # generation_config.json settings not reproduced
        note(f"{pre.path.name}: not applied: {setting}")
    if pre.source_tokenizer is None or pre.target_tokenizer is None:
        raise UsageError(
            f"--model {args.model} has no tokenizer files; an OpenNMT-tf checkpoint needs "
            "--source-vocabulary FILE and --target-vocabulary FILE (or an --onmt-config whose "
            "data section names them)"
        )
    options = search.decode_options(args, pre=pre, onmt=onmt, tokenizer=pre.target_tokenizer)
    size = search.batch_size(args, onmt)
    model, params = quantized(pre.model, pre.params, args.quantization, size * options.beam_size)
    pre = dataclasses.replace(pre, model=model, params=params)
    if args.source_prefix is None and pre.wants_prefix:
        warn(pre.prefix_warning().replace("source_prefix= / ", ""))
    args.with_scores = search.with_scores(args, onmt)
    engine = _engine(args, pre.model, pre.params, options, size, pre.special_ids)
    make = lambda todo: pre.iter_translate(
        todo, options, source_lang=args.source_lang, target_lang=args.target_lang,
        batch_size=size, truncate=args.truncate, source_prefix=args.source_prefix or "",
        engine_for=engine,
    )  # fmt: skip
    return make, options


def _trained(args, lines):
    """``--workdir RUN``: ``(make_outputs, options)`` with the run's tokenizers."""
    from jaxformer.decoding.texts import iter_translations

    refuse_unless(args, False, MODEL_ONLY, "to --model (imported checkpoints) only")
    run = load_run(args, "translate")
    onmt = search.read_onmt(args)
    options = search.decode_options(
        args, max_length=default_max_length(run), onmt=onmt, tokenizer=run.target_tokenizer
    )
    size = search.batch_size(args, onmt)
    model, params = quantized(run.model, run.params, args.quantization, size * options.beam_size)
    engine = _engine(args, model, params, options, size)
    make = lambda todo: iter_translations(
        model, params, run.source_tokenizer, run.target_tokenizer, todo, options,
        batch_size=size, truncate=args.truncate, source_prefix=args.source_prefix or "",
        engine_for=engine,
    )  # fmt: skip
    args.with_scores = search.with_scores(args, onmt)
    return make, options


def _engine(args, model, params, options, slots: int, special_ids=None):
    """``--engine``: the serving engine's factory for these options (None without the flag)."""
    if not getattr(args, "engine", False):
        return None
    from jaxformer.decoding.decode_options import SpecialIds
    from jaxformer.serving import engine_for

    try:
        return engine_for(
            model, params, options, slots=slots, special_ids=special_ids or SpecialIds()
        )
    except ValueError as error:
        raise UsageError(f"--engine: {error}") from None


def write_all(
    args, inputs: list[str], make_outputs, options, echo_inputs: bool = False, what: str = "lines"
) -> int:
    """Writes the outputs of ``make_outputs(inputs still to do)`` as they come; the warnings on
    what was unknown, cut or unfinished at the end; on Ctrl-C, what was written."""
    out = Output(args.output, resume=args.resume, per_input=options.n_best)
    results = []
    try:
        check_resumable(out.done, len(inputs), args.output)
        if out.done:
            note(f"--resume: {out.done} of {len(inputs)} lines are in {args.output} already")
        todo = inputs[out.done :]
        outputs = make_outputs(todo)
        with _progress(len(todo), "generating" if echo_inputs else "translating") as bar:
            for source, output in zip(todo, outputs, strict=False):
                out.write(_lines(output, options.n_best, args.with_scores, source, echo_inputs))
                results.append(output)
                bar.update(1)
    except KeyboardInterrupt:
        resume = "" if out.stream is sys.stdout else "; rerun with --resume to continue"
        print(
            f"jaxformer: interrupted: {out.done + out.written} of {len(inputs)} lines written to "
            f"{out.where()}{resume}",
            file=sys.stderr,
        )
        return 130
    finally:
        out.close()
    _warn(args, results, options, what)
    return 0


def _lines(output, n_best: int, with_scores: bool, source: str, echo: bool) -> list[str]:
    texts = [source + text if echo else text for text in output.texts[:n_best]]
    if not with_scores:
        return texts
    return [f"{score:.6f} ||| {text}" for text, score in zip(texts, output.scores, strict=False)]


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=total < PROGRESS_FROM, desc=desc, unit="line", leave=False)


def _warn(args, outputs, options, what: str) -> None:
    from jaxformer.decoding.texts import unknown_summary

    message = unknown_summary(outputs, what)
    if message and not args.no_unk_warning:
        warn(f"{message}; --no-unk-warning hides this")
    cut = sum(o.input_truncated for o in outputs)
    if cut:
        warn(f"{cut} of {len(outputs)} {what} were longer than the model allows and were cut to it")
    unfinished = sum(o.truncated for o in outputs)
    if unfinished:
        warn(
            f"{unfinished} output(s) reached --max-length {options.max_length} without an end token"
        )


def quantized(model, params, quantization: str | None, rows: int):
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
    check_at_least(args, "--batch-size", 1)
    check_output(args.output, {"--input": args.input})
    prompts = args.prompt or read_lines(args.input)
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT or lines on stdin / --input")
    if args.model is not None:
        make, options = _imported_lm(args)
        echo = False  # the checkpoint's tokenizer decodes prompt and continuation together
    else:
        make, options = _trained_lm(args, prompts)
        echo = args.return_prompt
    return write_all(args, prompts, make, options, echo_inputs=echo, what="prompts")


def _imported_lm(args):
    """``--model DIR``: a decoder-only checkpoint's ``(make_outputs, options)``."""
    refuse_unless(args, False, ("--onmt-config",), "to translation models only")
    pre = load_pretrained(args)
    if not pre.is_language_model:
        raise UsageError(
            f"--model {args.model} is a translation model ({pre.family}): use `jaxformer "
            "translate`; generate continues prompts with a decoder-only language model"
        )
    for setting in pre.generation.ignored:
        note(f"{pre.path.name}: not applied: {setting}")
    options = search.decode_options(args, pre=pre)
    size = search.batch_size(args, None)
    model, params = quantized(pre.model, pre.params, args.quantization, size * options.beam_size)
    pre = dataclasses.replace(pre, model=model, params=params)
    engine = _engine(args, model, params, options, size, pre.special_ids)
    make = lambda todo: pre.iter_generate(
        todo, options, return_prompt=args.return_prompt, batch_size=size, engine_for=engine
    )
    return make, options


def _trained_lm(args, prompts):
    """``--workdir RUN``: a trained language model's ``(make_outputs, options)``."""
    from jaxformer.decoding.texts import iter_continuations

    refuse_unless(args, False, MODEL_ONLY, "to --model (imported checkpoints) only")
    run = load_run(args, "lm")
    longest = max(len(run.target_tokenizer.encode(p)) for p in prompts)
    onmt = search.read_onmt(args)
    options = search.decode_options(
        args, max_length=default_max_length(run, prompt_tokens=longest), onmt=onmt
    )
    size = search.batch_size(args, onmt)
    model, params = quantized(run.model, run.params, args.quantization, size * options.beam_size)
    args.with_scores = search.with_scores(args, onmt)
    engine = _engine(args, model, params, options, size)
    make = lambda todo: iter_continuations(
        model, params, run.target_tokenizer, todo, options, batch_size=size, engine_for=engine
    )
    return make, options
