"""What the commands share: one-line usage errors in the command line's words, runs and models.

Errors from the library name Python parameters (``beam_size``, ``num_heads=N``); on the command
line they are reworded with the flags a user types (``--beam-size``, ``--num-heads N``):
``as_flags``.
"""

from __future__ import annotations

import argparse
import re
import sys

from jaxformer.decoding.options import require_int


class UsageError(ValueError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``jaxformer: error: ...`` line (see ``main``)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except for flags (off) and options whose help says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# Library parameter -> command-line flag. ``name=`` forms first ("num_heads=N" -> "--num-heads N").
FLAGS = {
    "beam_size": "--beam-size",
    "length_penalty": "--length-penalty",
    "coverage_penalty": "--coverage-penalty",
    "sampling_topk": "--sampling-topk",
    "sampling_temperature": "--sampling-temperature",
    "top_p": "--top-p",
    "min_length": "--min-length",
    "max_length": "--max-length",
    "n_best": "--n-best",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "target_prefix": "--target-prefix",
    "source_prefix": "--source-prefix",
    "source_lang": "--source-lang",
    "target_lang": "--target-lang",
    "num_heads": "--num-heads",
    "positions": "--positions",
    "source_vocabulary": "--source-vocabulary",
    "target_vocabulary": "--target-vocabulary",
    "model": "--model-type",  # load_pretrained's OpenNMT-tf catalog hint
    "dtype": "--dtype",
    "truncate": "--truncate",
    "repetition_penalty": "--repetition-penalty",
    "no_repeat_ngram_size": "--no-repeat-ngram-size",
    "stop": "--stop",
}
_ASSIGNMENT = re.compile(r"(?<![\w.-])(" + "|".join(FLAGS) + r")=(?!=)'?([^'\s,)]*)'?")
_NAME = re.compile(r"(?<![\w.-])(" + "|".join(n for n in FLAGS if "_" in n) + r")\b")


def as_flags(message: str) -> str:
    """``message`` with the library's parameter names replaced by their flags: ``n_best must be
    an int in [1, beam_size=2]`` -> ``--n-best must be an int in [1, --beam-size 2]``, ``pass
    num_heads=N (or model='TransformerBase')`` -> ``pass --num-heads N (or --model-type
    TransformerBase)``. Names inside dotted config keys (``run.beam_size``) are left alone."""
    message = _ASSIGNMENT.sub(lambda m: f"{FLAGS[m.group(1)]} {m.group(2)}".rstrip(), message)
    message = _NAME.sub(lambda m: FLAGS[m.group(1)], message)
    return message.replace("load_pretrained: ", "--model: ")


def check_at_least(args, name: str, low: int) -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"))
    if value is not None:
        try:
            require_int(name, value, low)
        except ValueError as error:
            raise UsageError(str(error)) from None


def refuse_unless(args, applies: bool, flags: tuple[str, ...], where: str) -> None:
    """An option given where it cannot apply is an error naming it (never silently ignored)."""
    if applies:
        return
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value not in (None, False):
            raise UsageError(f"{flag} applies {where}")


def warn(message: str) -> None:
    print(f"jaxformer: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    print(f"jaxformer: note: {message}", file=sys.stderr)


def default_max_length(run, prompt_tokens: int = 0) -> int:
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


def load_run(args, task: str | None):
    """The run in ``--workdir`` at ``--checkpoint``; ``task`` (if given) must be its task."""
    from jaxformer.training.runs import load_run

    checkpoint = args.checkpoint or "best"
    step = checkpoint if checkpoint in ("best", "latest") else _step(checkpoint)
    run = load_run(args.workdir, step)
    if task is not None and run.config.task != task:
        raise UsageError(
            f"--workdir {args.workdir} holds a {run.config.task!r} model; "
            f"use `jaxformer {'translate' if run.config.task == 'translate' else 'generate'}`"
        )
    return run


def _step(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--checkpoint must be 'best', 'latest' or a step, got {text!r}") from None


# --model's options, by the load_pretrained hint each sets (OpenNMT-tf needs some).
MODEL_HINTS = {
    "source_vocabulary": "source_vocabulary",
    "target_vocabulary": "target_vocabulary",
    "num_heads": "num_heads",
    "model_type": "model",
    "positions": "positions",
    "dtype": "dtype",
}
MODEL_ONLY = (
    "--source-lang",
    "--target-lang",
    "--source-vocabulary",
    "--target-vocabulary",
    "--num-heads",
    "--model-type",
    "--positions",
    "--dtype",
)


def load_pretrained(args, onmt=None):
    """``--model DIR`` with the hints given on the command line, or (vocabularies) in the
    ``--onmt-config`` file ``onmt``."""
    from jaxformer.interop import load_pretrained

    refuse_unless(args, args.checkpoint is None, ("--checkpoint",), "to --workdir runs only")
    given = {a: getattr(args, a, None) for a in MODEL_HINTS}
    hints = {h: given[a] for a, h in MODEL_HINTS.items() if given[a] is not None}
    if onmt is not None:
        for name, path in zip(
            ("source_vocabulary", "target_vocabulary"), onmt.vocabularies, strict=True
        ):
            if path is not None:
                hints.setdefault(name, str(path))
    if (
        getattr(args, "source_lang", None) is not None
        and getattr(args, "target_lang", None) is None
    ):
        raise UsageError("--source-lang needs --target-lang (the language forced first)")
    try:
        return load_pretrained(args.model, **hints)
    except TypeError as error:  # a hint this kind of checkpoint does not take
        raise UsageError(as_flags(str(error))) from None
