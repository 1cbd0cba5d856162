"""A request's search options: ``DecodeOptions`` from the server's defaults and the fields a request
names, checked against what the engine serves. Every refusal is a ``RequestError`` naming the field.

Fields are named as in ``DecodeOptions`` (``SEARCH_FIELDS``). An option a request names wins over
the default; a default that cannot apply under the request's choice is dropped, as the command
line drops an ``--onmt-config`` value (a default ``length_penalty`` once a request asks for
``beam_size`` 1; a default temperature once it asks for ``sampling_topk`` 1), and a default
``n_best`` is cut to the request's beam size. An option the request names that cannot apply is
refused (``DecodeOptions`` says why).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from jaxformer.decoding.decode_options import DecodeOptions

# The DecodeOptions fields a request may name, with the type a form field is read as.
SEARCH_FIELDS = {
    "beam_size": int,
    "length_penalty": float,
    "coverage_penalty": float,
    "sampling_topk": int,
    "sampling_temperature": float,
    "top_p": float,
    "max_length": int,
    "min_length": int,
    "seed": int,
    "n_best": int,
}
# option -> (the option it needs, the value under which it cannot apply, its neutral value)
NEEDS = {
    "length_penalty": ("beam_size", 1, 0.0),
    "coverage_penalty": ("beam_size", 1, 0.0),
    "sampling_temperature": ("sampling_topk", 1, 1.0),
    "top_p": ("sampling_topk", 1, 1.0),
}
_NAMES = re.compile(r"\b(" + "|".join(sorted(SEARCH_FIELDS, key=len, reverse=True)) + r")\b")


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a message, the ``field`` at fault (or None)."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the engine serves (``Limits.of(engine)``)."""

    widths: tuple[int, ...]
    max_length: int
    max_input_length: int
    sampling_topk: int | None  # None: no sampling
    nucleus: bool
    coverage: bool

    @classmethod
    def of(cls, engine) -> Limits:
        layout = engine.layout
        return cls(
            layout.widths,
            layout.max_length,
            layout.max_input_length,
            layout.sampling_topk,
            layout.nucleus,
            layout.coverage,
        )

    def check(self, o: DecodeOptions) -> None:
        if o.beam_size not in self.widths:
            sizes = ", ".join(map(str, self.widths))
            raise RequestError(
                f"beam_size={o.beam_size}: this server serves beam sizes {sizes} (jaxformer serve "
                "--beam-size, --beam-widths)",
                "beam_size",
            )
        if o.max_length > self.max_length:
            raise RequestError(
                f"max_length={o.max_length}: at most {self.max_length} on this server (jaxformer "
                "serve --max-length)",
                "max_length",
            )
        if o.sampling_topk != 1 and o.sampling_topk != self.sampling_topk:
            can = (
                "does not sample (jaxformer serve --sampling-topk 0 or k > 1 makes one that does)"
                if self.sampling_topk is None
                else f"samples with sampling_topk={self.sampling_topk} only"
            )
            raise RequestError(
                f"sampling_topk={o.sampling_topk}: this server {can}", "sampling_topk"
            )
        if o.top_p < 1 and not self.nucleus:
            raise RequestError("top_p < 1: this server does not sample", "top_p")
        if o.coverage_penalty != 0 and not self.coverage:
            raise RequestError(
                "coverage_penalty: this server was started without a coverage penalty (jaxformer "
                "serve --coverage-penalty X allows it)",
                "coverage_penalty",
            )


def read_field(name: str, value, kind):
    """A form field's text as ``kind`` (JSON values are left as they are: ``DecodeOptions`` checks
    their types)."""
    if not isinstance(value, str):
        return value
    try:
        return kind(value)
    except ValueError:
        raise RequestError(f"{name} must be a {kind.__name__}, got {value!r}", name) from None


def decode_options(defaults: DecodeOptions, given: Mapping, limits: Limits) -> DecodeOptions:
    """The request's ``DecodeOptions``: ``defaults`` with the fields in ``given`` (module
    docstring), checked by ``DecodeOptions`` and against ``limits``."""
    unknown = set(given) - set(SEARCH_FIELDS)
    if unknown:
        raise RequestError(f"unknown search option {sorted(unknown)[0]!r}", sorted(unknown)[0])
    chosen = {name: getattr(defaults, name) for name in SEARCH_FIELDS}
    chosen |= {name: read_field(name, v, SEARCH_FIELDS[name]) for name, v in given.items()}
    for name, (needed, inert, neutral) in NEEDS.items():
        if name not in given and chosen[needed] == inert:
            chosen[name] = neutral
    if "n_best" not in given and isinstance(chosen["beam_size"], int):
        chosen["n_best"] = max(1, min(chosen["n_best"], chosen["beam_size"]))
    try:
        options = dataclasses.replace(defaults, **chosen)
    except (ValueError, TypeError) as error:
        raise RequestError(str(error), field_of(str(error), given)) from None
    limits.check(options)
    return options


def field_of(message: str, given: Mapping = ()) -> str | None:
    """The search option a message is about: the first one it names, preferring those the request
    gave."""
    names = _NAMES.findall(message)
    for name in names:
        if name in given:
            return name
    return names[0] if names else None


__all__ = ["NEEDS", "SEARCH_FIELDS", "Limits", "RequestError", "decode_options", "field_of"]
