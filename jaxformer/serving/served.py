"""What a server serves: one model with its tokenizers, default search options and languages, and
the engine built for it.

``ServedModel`` is text on both sides of the engine: ``source_ids`` (a translation source, framed
for its language; a prompt), ``target_prefix`` (NLLB's target-language token), ``text`` (output
ids to text, as ``Pretrained.translate`` / ``generate`` decode them). ``make_engine`` builds the
engine from the command line's shape: ``slots`` groups for greedy search and sampling, and
``max(1, slots // W)`` groups of W rows for each beam width W.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxformer.decoding.decode_options import DecodeOptions, SpecialIds
from jaxformer.serving.engine import UNSERVED, Engine
from jaxformer.serving.languages import Languages


@dataclasses.dataclass(frozen=True, eq=False)
class ServedModel:
    """A translation model or a decoder-only LM, as the server uses it."""

    name: str  # OpenAI's ``model``: the directory's name
    model: Any
    params: Any
    special: SpecialIds
    source_tokenizer: Any  # an LM's prompts: the same as target_tokenizer
    target_tokenizer: Any
    defaults: DecodeOptions  # a request's options before it names any
    languages: Languages | None = None  # translation models
    source_prefix: str = ""  # text put before every source (T5's task prefix)
    sampling_by_default: bool = False  # the defaults sample (OpenAI requests without temperature)

    @property
    def is_language_model(self) -> bool:
        from jaxformer.models.decoder_only import DecoderOnlyLM

        return isinstance(self.model, DecoderOnlyLM)

    @property
    def multilingual(self) -> bool:
        return self.languages is not None and self.languages.pair is None

    def source_ids(self, text: str, language: str | None = None) -> list[int]:
        """A source's ids (``language``: the code ``Languages.resolve`` gave, a multilingual
        model's source language), or a prompt's."""
        tokenizer = self.source_tokenizer
        if language is not None and self.multilingual:
            tokenizer = tokenizer.for_language(self.languages.codes[language])
        return list(tokenizer.encode(self.source_prefix + text))

    def target_prefix(self, language: str | None) -> tuple[int, ...]:
        """The target prefix a translation into ``language`` forces (a multilingual model's
        language token; else the checkpoint's forced first token, if any)."""
        if language is not None and self.multilingual:
            return (self.target_tokenizer.token_id(self.languages.codes[language]),)
        return tuple(self.defaults.target_prefix)

    @property
    def prefix_length(self) -> int:
        if self.is_language_model:
            return 0
        return 1 if self.multilingual else len(self.defaults.target_prefix)

    def text(self, ids: Sequence[int]) -> str:
        return self.target_tokenizer.decode([int(i) for i in ids])


def check_served_defaults(defaults: DecodeOptions) -> None:
    """The default options must be ones the engine serves (a ``ValueError`` names the first that
    is not: the command line's flag or the checkpoint's generation setting)."""
    for name, neutral in UNSERVED:
        if getattr(defaults, name) != neutral:
            raise ValueError(
                f"{name}={getattr(defaults, name)!r}: the serving engine does not serve it (the "
                f"checkpoint's default or the flag: pass {name}={neutral!r} to serve without it)"
            )


def widths_served(defaults: DecodeOptions, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """Greedy search (1), the default beam size and ``extra`` widths."""
    return tuple(sorted({1, defaults.beam_size, *extra}))


def make_engine(
    served: ServedModel,
    *,
    slots: int,
    widths: Sequence[int],
    max_length: int,
    max_input_length: int,
    sampling_topk: int | None,
    coverage: bool,
    chunk_size: int = 8,
    bucket: int = 16,
) -> Engine:
    """The engine of a server (started): see the module docstring for its groups."""
    groups = {w: (slots if w == 1 else max(1, slots // w)) for w in widths}
    return Engine(
        served.model,
        served.params,
        start_id=served.special.start,
        end_id=served.special.end,
        groups=groups,
        max_length=max_length,
        max_input_length=max_input_length,
        sampling_topk=sampling_topk,
        nucleus=sampling_topk is not None,
        coverage=coverage,
        chunk_size=chunk_size,
        bucket=bucket,
        suppress_ids=tuple(served.defaults.suppress_ids),
        prefix_length=served.prefix_length,
    )


__all__ = ["ServedModel", "check_served_defaults", "make_engine", "widths_served"]
