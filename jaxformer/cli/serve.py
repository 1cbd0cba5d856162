"""``jaxformer serve``: a model behind an HTTP API its users' clients already speak.

A translation model is served with LibreTranslate's API (``/translate``, ``/languages``), a
decoder-only model with OpenAI's completions API (``/v1/completions``, ``/v1/models``); both have
``/health`` and ``/metrics`` (``jaxformer/serving/app.py``). One continuous-batching engine decodes
every request; the command line fixes its shape (slots, beam widths, longest input and output,
sampling top-k) and the search options a request gets when it names none (the same flags and
precedence as ``translate`` and ``generate``: ``search.py``).
"""

from __future__ import annotations

from pathlib import Path

from jaxformer.cli import search
from jaxformer.cli.common import (
    UsageError,
    check_at_least,
    default_max_length,
    load_pretrained,
    load_run,
    note,
    refuse_unless,
    warn,
)

DEFAULT_INPUT = 256  # tokens: the default --max-input-length, within the model's positions


def cmd_serve(args) -> int:
    try:
        import uvicorn  # noqa: F401  (the serve extra)
        from starlette.applications import Starlette  # noqa: F401
    except ImportError as error:
        raise UsageError(
            f"jaxformer serve needs {error.name}: pip install -e '.[serve]' from the repository"
        ) from None
    from jaxformer.serving.app import ServerState
    from jaxformer.serving.server import run

    for flag in ("--slots", "--queue-size", "--chunk-size", "--max-input-length", "--port"):
        check_at_least(args, flag, 0 if flag in ("--queue-size", "--port") else 1)
    if args.stop:
        raise UsageError("--stop: requests name their own stop strings (OpenAI's stop)")
    served, sampling_topk = served_model(args)
    engine = build_engine(args, served, sampling_topk)
    state = ServerState(
        served, engine, queue_size=args.queue_size, warmup=args.warmup,
        random_seeds=args.seed is None,
    )  # fmt: skip
    api = "OpenAI completions" if served.is_language_model else "LibreTranslate"
    layout = engine.layout
    shape = ", ".join(f"{g} x {w}" for w, g in zip(layout.widths, layout.groups, strict=True))
    note(
        f"serving {served.name} ({api} API) on http://{args.host}:{args.port}: groups of slots "
        f"(count x beam width) {shape}, inputs up to {layout.max_input_length} tokens, outputs up "
        f"to {layout.max_length}; ready once compiled (GET /health)"
    )
    return run(state, host=args.host, port=args.port, log_level=args.log_level)


def served_model(args):
    """The ``ServedModel`` of ``--model`` or ``--workdir``, and the engine's sampling top-k."""
    from jaxformer.decoding.decode_options import SpecialIds
    from jaxformer.serving.languages import Languages, parse_pair
    from jaxformer.serving.served import ServedModel, check_served_defaults

    if args.model is not None:
        onmt = search.read_onmt(args, args.model)
        pre = load_pretrained(args, onmt)
        for setting in pre.generation.ignored:
            note(f"{pre.path.name}: not applied: {setting}")
        if pre.target_tokenizer is None or pre.source_tokenizer is None:
            raise UsageError(
                f"--model {args.model} has no tokenizer files (an OpenNMT-tf checkpoint needs "
                "--source-vocabulary and --target-vocabulary)"
            )
        model, params, special = pre.model, pre.params, pre.special_ids
        source, target, is_lm = pre.source_tokenizer, pre.target_tokenizer, pre.is_language_model
        defaults = search.decode_options(args, pre=pre, onmt=onmt)
        name, prefixes = Path(args.model).name, pre.task_prefixes
        warning = pre.prefix_warning() if pre.wants_prefix else None
    else:
        refuse_unless(args, False, _MODEL_ONLY, "to --model (imported checkpoints) only")
        run = load_run(args, None)
        model, params, special = run.model, run.params, SpecialIds()
        source, target, is_lm = run.source_tokenizer, run.target_tokenizer, run.config.task == "lm"
        onmt = search.read_onmt(args)
        stored = default_max_length(run, prompt_tokens=1 if is_lm else 0)
        defaults = search.decode_options(args, max_length=stored, onmt=onmt)
        name, prefixes, warning = Path(args.workdir).resolve().name, {}, None
    try:
        check_served_defaults(defaults)
    except ValueError as error:
        raise UsageError(str(error)) from None
    from jaxformer.cli.decode import quantized

    model, params = quantized(model, params, args.quantization, args.slots)
    languages, prefix = None, args.source_prefix or ""
    if is_lm:
        refuse_unless(args, False, ("--languages", "--source-prefix"), "to translation models")
    else:
        vocabulary = _vocabulary(target)
        languages = Languages.of_tokens(vocabulary) if vocabulary else None
        if languages is not None:
            refuse_unless(args, False, ("--languages",), "to single-pair models (this one has "
                          "language tokens: requests name source and target)")  # fmt: skip
        elif args.languages is None:
            raise UsageError(
                "--languages SOURCE:TARGET is required: the codes of the one pair this model "
                "translates (e.g. en:de), which requests must name"
            )
        else:
            try:
                languages = Languages.of_pair(*parse_pair(args.languages))
            except ValueError as error:
                raise UsageError(str(error)) from None
            task = "translation_{}_to_{}".format(*languages.pair)
            if args.source_prefix is None and task in prefixes:
                prefix = prefixes[task]
                note(f"source prefix {prefix!r} (the checkpoint's {task})")
        if warning and not prefix:
            warn(warning.replace("source_prefix= / ", ""))
    served = ServedModel(
        name=args.served_model_name or name, model=model, params=params, special=special,
        source_tokenizer=source, target_tokenizer=target, defaults=defaults,
        languages=languages, source_prefix=prefix,
    )  # fmt: skip
    sampling = defaults.sampling_topk if defaults.sampling_topk != 1 else None
    if sampling is None and is_lm:
        sampling = 0  # OpenAI's temperature samples from the whole vocabulary
    return served, sampling


_MODEL_ONLY = (
    "--source-vocabulary",
    "--target-vocabulary",
    "--num-heads",
    "--model-type",
    "--positions",
    "--dtype",
)


def _vocabulary(tokenizer) -> list[str]:
    """The token strings of a ``tokenizer.json`` tokenizer (where language tokens live), or []."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or not hasattr(inner, "get_vocab"):
        return []
    return list(inner.get_vocab(with_added_tokens=True))


def build_engine(args, served, sampling_topk):
    """The engine of ``--slots``, ``--beam-widths``, ``--max-length``, ``--max-input-length``."""
    from jaxformer.decoding.adapters import adapter_for
    from jaxformer.serving.served import make_engine, widths_served

    spec = adapter_for(served.model).inputs
    adapter = adapter_for(served.model)
    max_length = served.defaults.max_length
    if args.max_input_length is not None:
        longest = args.max_input_length
    elif served.is_language_model:
        longest = min(DEFAULT_INPUT, spec.max_len + 1 - max_length)
    else:
        longest = min(DEFAULT_INPUT, spec.max_len)
    if longest < 1 or adapter.positions(longest, max_length) > spec.max_len:
        raise UsageError(
            f"--max-input-length {longest} and --max-length {max_length} need "
            f"{adapter.positions(max(longest, 1), max_length)} positions, more than the model's "
            f"{spec.max_len}: lower one of them"
        )
    widths = widths_served(served.defaults, _widths(args.beam_widths))
    try:
        return make_engine(
            served, slots=args.slots, widths=widths, max_length=max_length,
            max_input_length=longest, sampling_topk=sampling_topk,
            coverage=served.defaults.coverage_penalty != 0, chunk_size=args.chunk_size,
        )  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from None


def _widths(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise UsageError(f"--beam-widths must be beam sizes separated by commas, got {text!r}")
    return widths


__all__ = ["cmd_serve"]
