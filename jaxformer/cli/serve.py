"""``jaxformer serve``: a model behind an HTTP API its users' clients already speak.

A translation model is served with LibreTranslate's API (``/translate``, ``/languages``), a
decoder-only model with OpenAI's completions API (``/v1/completions``, ``/v1/models``); both have
``/health`` and ``/metrics`` (``jaxformer/serving/app.py``). One continuous-batching engine decodes
every request; the command line fixes its shape (slots, beam widths, longest input and output,
sampling top-k) and the search options a request gets when it names none (the same flags and
precedence as ``translate`` and ``generate``: ``search.py``).
"""

from __future__ import annotations

import dataclasses
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
    from jaxformer.cli.decode import quantized
    from jaxformer.serving.served import ServedModel, check_served_defaults

    loaded = _load(args)
    try:
        check_served_defaults(loaded.defaults)
    except ValueError as error:
        raise UsageError(str(error)) from None
    model, params = quantized(loaded.model, loaded.params, args.quantization, args.slots)
    if loaded.is_lm:
        refuse_unless(args, False, ("--languages", "--source-prefix"), "to translation models")
        languages, prefix = None, ""
    else:
        languages, prefix = _languages(args, loaded)
    served = ServedModel(
        name=args.served_model_name or loaded.name, model=model, params=params,
        special=loaded.special, source_tokenizer=loaded.source, target_tokenizer=loaded.target,
        defaults=loaded.defaults, languages=languages, source_prefix=prefix,
    )  # fmt: skip
    sampling = loaded.defaults.sampling_topk if loaded.defaults.sampling_topk != 1 else None
    if sampling is None and loaded.is_lm:
        sampling = 0  # OpenAI's temperature samples from the whole vocabulary
    return served, sampling


@dataclasses.dataclass
class _Loaded:
    """A model as loaded from ``--model`` or ``--workdir``, before the server wraps it."""

    name: str
    model: object
    params: object
    special: object  # SpecialIds
    source: object  # tokenizers
    target: object
    is_lm: bool
    defaults: object  # DecodeOptions
    prefixes: dict  # the checkpoint's task prefixes (T5)
    warning: str | None  # why this model wants a source prefix


def _load(args) -> _Loaded:
    from jaxformer.decoding.decode_options import SpecialIds

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
        return _Loaded(
            Path(args.model).name, pre.model, pre.params, pre.special_ids, pre.source_tokenizer,
            pre.target_tokenizer, pre.is_language_model,
            search.decode_options(args, pre=pre, onmt=onmt), pre.task_prefixes,
            pre.prefix_warning() if pre.wants_prefix else None,
        )  # fmt: skip
    refuse_unless(args, False, _MODEL_ONLY, "to --model (imported checkpoints) only")
    run = load_run(args, None)
    is_lm = run.config.task == "lm"
    stored = default_max_length(run, prompt_tokens=1 if is_lm else 0)
    defaults = search.decode_options(args, max_length=stored, onmt=search.read_onmt(args))
    return _Loaded(
        Path(args.workdir).resolve().name, run.model, run.params, SpecialIds(),
        run.source_tokenizer, run.target_tokenizer, is_lm, defaults, {}, None,
    )  # fmt: skip


def _languages(args, loaded: _Loaded):
    """A translation model's ``Languages`` (its language tokens, else ``--languages``) and the
    text put before every source."""
    from jaxformer.serving.languages import Languages, parse_pair

    prefix = args.source_prefix or ""
    vocabulary = _vocabulary(loaded.target)
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
        if args.source_prefix is None and task in loaded.prefixes:
            prefix = loaded.prefixes[task]
            note(f"source prefix {prefix!r} (the checkpoint's {task})")
    if loaded.warning and not prefix:
        warn(loaded.warning.replace("source_prefix= / ", ""))
    return languages, prefix


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

    adapter = adapter_for(served.model)
    spec = adapter.inputs
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
