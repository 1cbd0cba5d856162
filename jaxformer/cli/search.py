"""The search options of a command: flags, then an OpenNMT-tf run configuration, then defaults.

Precedence: a flag given on the command line; else the value in ``--onmt-config FILE`` (its
``params`` and ``infer`` sections, ``interop.opennmt_config``); else the checkpoint's generation
defaults (``--model``) or the run's (``--workdir``); else jaxformer's defaults (``DEFAULTS``, shown
in ``--help``). A flag that cannot apply is an error (``DecodeOptions`` says which); a value from
the configuration file that cannot apply under the final choice (a length penalty once
``--beam-size 1`` wins) is dropped with a note, as ``onmt-main`` ignores it.
"""

from __future__ import annotations

import dataclasses

from jaxformer.cli.common import note

SEARCH = (
    "beam_size",
    "length_penalty",
    "coverage_penalty",
    "sampling_topk",
    "sampling_temperature",
    "top_p",
    "min_length",
    "max_length",
    "n_best",
    "seed",
    "repetition_penalty",
    "no_repeat_ngram_size",
)
DEFAULTS = dict(
    beam_size=1,
    length_penalty=0.0,
    coverage_penalty=0.0,
    sampling_topk=1,
    sampling_temperature=1.0,
    top_p=1.0,
    min_length=0,
    n_best=1,
    seed=0,
    batch_size=32,
)
# option -> (the option it needs, the value under which it cannot apply)
NEEDS = {
    "length_penalty": ("beam_size", 1),
    "coverage_penalty": ("beam_size", 1),
    "sampling_temperature": ("sampling_topk", 1),
    "top_p": ("sampling_topk", 1),
}


def read_onmt(args, model_dir=None):
    """The ``--onmt-config`` file's settings, or None."""
    if getattr(args, "onmt_config", None) is None:
        return None
    from jaxformer.interop.opennmt_config import read_opennmt_config

    return read_opennmt_config(args.onmt_config, model_dir)


def chosen_options(args, onmt) -> dict:
    """``DecodeOptions`` keyword arguments given by flags or by the configuration file."""
    explicit = {name: getattr(args, name) for name in SEARCH if getattr(args, name) is not None}
    from_file = dict(onmt.decoding) if onmt is not None else {}
    chosen = {**from_file, **explicit}
    for name, (needed, inert) in NEEDS.items():
        if name in explicit or name not in from_file:
            continue
        if chosen.get(needed, DEFAULTS[needed]) == inert:
            del chosen[name]
            flag = "--" + needed.replace("_", "-")
            note(f"{onmt.path}: {name}={from_file[name]} not applied ({flag} {inert})")
    return chosen


def decode_options(args, *, max_length: int | None = None, pre=None, onmt=None, tokenizer=None):
    """The ``DecodeOptions`` of a command: ``pre`` (an imported checkpoint) brings its generation
    defaults; ``max_length``: the run's default; ``--target-prefix`` text is encoded with
    ``tokenizer`` and forced after any language token."""
    from jaxformer.decoding.texts import DecodeOptions

    chosen = chosen_options(args, onmt)
    if pre is not None:
        options = pre.decode_options(getattr(args, "target_lang", None), **chosen)
    else:
        options = DecodeOptions(**{"max_length": max_length, **chosen})
    text = getattr(args, "target_prefix", None)
    if text:
        ids = tuple(tokenizer.encode(text))
        options = dataclasses.replace(options, target_prefix=options.target_prefix + ids)
    return options


def batch_size(args, onmt) -> int:
    if args.batch_size is not None:
        return args.batch_size
    if onmt is not None and onmt.batch_size is not None:
        return onmt.batch_size
    return DEFAULTS["batch_size"]


def with_scores(args, onmt) -> bool:
    return bool(args.with_scores or (onmt is not None and onmt.with_scores))
