"""LibreTranslate's API for translation models: ``POST /translate`` and ``GET /languages``.

As LibreTranslate's (its API docs, ``docs.libretranslate.com``) and its clients (``libretranslatepy``,
its web front end, Mastodon) use it: a JSON body or a form (``libretranslatepy`` sends forms) with

- ``q``: a text, or a list of texts (then every field of the answer is a list, in order);
- ``source``, ``target``: language codes (``Languages``: ISO 639-1 such as ``en``, or the
  checkpoint's own such as ``eng_Latn``); ``source`` may be ``auto`` for a single-pair model (no
  language is detected: the model has one source language, which the answer reports as
  ``detectedLanguage``);
- ``format``: ``text`` (the default) or ``html`` (the text between tags is translated, piece by
  piece; tags, ``script`` and ``style`` are kept as they are);
- ``alternatives``: how many other translations to return beside the best (the next hypotheses of
  the beam search, duplicates of another's text left out): it needs a beam of ``alternatives + 1``
  or more, and a request that names no ``beam_size`` gets the smallest the server has;
- ``api_key``: accepted and ignored;
- the search options, named as in ``DecodeOptions`` (``beam_size``, ``length_penalty``, ...:
  ``requests.SEARCH_FIELDS``); the server's defaults are the command line's.

Answers: ``{"translatedText": ...}``, with ``alternatives`` when asked; errors ``{"error": "..."}``
(400 naming the field, 503 with ``Retry-After`` when busy, starting or shutting down). An empty
text translates to an empty text without decoding, as ``Pretrained.translate`` does.
"""

from __future__ import annotations

import dataclasses
import html
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxformer.serving.app import (
    ClientGone,
    EngineStopped,
    ServerState,
    busy_headers,
    read_body,
    result_of,
    until_disconnected,
)
from jaxformer.serving.languages import LanguageError
from jaxformer.serving.requests import SEARCH_FIELDS, RequestError, decode_options, read_field

FIELDS = {"q", "source", "target", "format", "alternatives", "api_key", *SEARCH_FIELDS}
_TAG = re.compile(r"(<[^>]*>)")
_RAW = re.compile(r"<(script|style)\b", re.I)  # elements whose text is not translated


@dataclasses.dataclass
class _Job:
    texts: list[list[str]]  # per q: its pieces (format html: tags and text; text: one piece)
    translate: list[list[bool]]  # per q: which pieces are translated
    source_ids: dict[tuple[int, int], list[int]]  # (q, piece) -> the source's ids
    options: object
    alternatives: int
    single: bool  # q was one text
    detected: str | None  # source "auto": the model's source language


def routes(state: ServerState) -> list[Route]:
    async def translate(request: Request) -> Response:
        try:
            state.check_admitting()
            job = _parse(state, await read_body(request, forms=True))
            with state.admitted(len(job.source_ids), "q"):
                return JSONResponse(await until_disconnected(request, _run(state, job)))
        except RequestError as error:
            return _error(error)
        except EngineStopped as error:
            return _error(RequestError(str(error), status=503))
        except ClientGone:
            state.metrics.disconnects.inc()  # as the completions API counts them
            return Response(status_code=499)

    async def languages(request: Request) -> Response:
        return JSONResponse(state.served.languages.listing())

    return [
        Route("/translate", translate, methods=["POST"]),
        Route("/languages", languages, methods=["GET", "POST"]),
    ]


def _error(error: RequestError) -> Response:
    return JSONResponse({"error": error.message}, error.status, headers=busy_headers(error))


def _parse(state: ServerState, body: dict) -> _Job:
    served, languages = state.served, state.served.languages
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r}; /translate takes q, source, target, format, "
            f"alternatives, api_key and the search options {', '.join(SEARCH_FIELDS)}",
            unknown[0],
        )
    for name in ("q", "source", "target"):
        if name not in body:
            raise RequestError(f"Invalid request: missing {name} parameter", name)
    q = body["q"]
    single = isinstance(q, str)
    texts = [q] if single else q
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError("q must be a text or a non-empty list of texts", "q")
    detected = None
    try:
        if body["source"] == "auto" and languages.pair is not None:
            source = detected = languages.pair[0]
        elif body["source"] == "auto":
            raise LanguageError(
                "source", "'auto' (language detection) is not served: name the source language"
            )
        else:
            source = languages.resolve("source", body["source"])
        target = languages.resolve("target", body["target"])
        languages.check_pair(source, target)
    except LanguageError as error:
        raise RequestError(str(error), error.field) from None
    form = body.get("format", "text")
    if form not in ("text", "html"):
        raise RequestError(f"format must be 'text' or 'html', got {form!r}", "format")
    alternatives = read_field("alternatives", body.get("alternatives", 0), int)
    if isinstance(alternatives, bool) or not isinstance(alternatives, int) or alternatives < 0:
        raise RequestError(
            f"alternatives must be an int >= 0, got {alternatives!r}", "alternatives"
        )
    given = {name: body[name] for name in SEARCH_FIELDS if name in body}
    if alternatives:
        if form == "html":
            raise RequestError("alternatives: not served with format html", "alternatives")
        _beam_for(state, given, alternatives)
    options = decode_options(served.defaults, given, state.limits)
    options = dataclasses.replace(options, target_prefix=served.target_prefix(target))
    pieces, chosen, ids = [], [], {}
    for i, text in enumerate(texts):
        parts = _TAG.split(text) if form == "html" else [text]
        chosen.append(_translated(parts) if form == "html" else [bool(text)])
        pieces.append(parts)
        for k, part in enumerate(parts):
            if chosen[-1][k]:
                source_text = html.unescape(part.strip()) if form == "html" else part
                ids[i, k] = served.source_ids(source_text, source)
                _check_length(state, ids[i, k], "q" if single else f"q[{i}]")
    return _Job(pieces, chosen, ids, options, alternatives, single, detected)


def _beam_for(state: ServerState, given: dict, alternatives: int) -> None:
    """``given`` with ``n_best = alternatives + 1`` and, if it names no ``beam_size``, a beam
    that wide (the default, else the narrowest the server has)."""
    wanted = alternatives + 1
    if "n_best" in given and read_field("n_best", given["n_best"], int) != wanted:
        raise RequestError(f"n_best: {given['n_best']} contradicts alternatives={alternatives}")
    given["n_best"] = wanted
    if "beam_size" in given or state.served.defaults.beam_size >= wanted:
        return
    wide = [w for w in state.limits.widths if w >= wanted]
    if not wide:
        raise RequestError(
            f"alternatives={alternatives} needs a beam of {wanted} or more; this server's widest "
            f"is {max(state.limits.widths)} (jaxformer serve --beam-widths)",
            "alternatives",
        )
    given["beam_size"] = wide[0]


def _translated(parts: list[str]) -> list[bool]:
    """Which pieces of an HTML text are translated: text with words, not inside script or style."""
    out, raw = [], False
    for k, part in enumerate(parts):
        if k % 2:  # a tag
            raw = bool(_RAW.match(part)) or (raw and not part.lower().startswith("</"))
            out.append(False)
        else:
            out.append(bool(part.strip()) and not raw)
    return out


def _check_length(state: ServerState, ids: list[int], field: str) -> None:
    most = state.limits.max_input_length
    if len(ids) > most:
        raise RequestError(
            f"{field}: {len(ids)} tokens, more than this server's {most} (jaxformer serve "
            "--max-input-length)",
            field,
        )


async def _run(state: ServerState, job: _Job) -> dict:
    handles = {}
    try:
        for (i, k), ids in job.source_ids.items():
            field = "q" if job.single else f"q[{i}]"
            handles[i, k] = state.submit(ids, job.options, field)
        results = {key: await result_of(h) for key, h in handles.items()}
    finally:
        for handle in handles.values():
            handle.cancel()
    served, n = state.served, job.options.n_best
    translated, alternatives = [], []
    for i, parts in enumerate(job.texts):
        hypotheses = []
        for rank in range(n):
            out = []
            for k, part in enumerate(parts):
                if not job.translate[i][k]:
                    out.append(part if len(parts) > 1 else "")
                    continue
                r = results[i, k]
                text = served.text(r.ids[0, rank, : r.lengths[0, rank]])
                state.metrics.output_tokens.inc(int(r.lengths[0, rank]))
                if len(parts) > 1:  # html: the text's spaces around it, escaped
                    lead, trail = part[: len(part) - len(part.lstrip())], part[len(part.rstrip()) :]
                    text = lead + html.escape(text, quote=False) + trail
                out.append(text)
            hypotheses.append("".join(out))
        translated.append(hypotheses[0])
        others = [h for h in dict.fromkeys(hypotheses[1:]) if h != hypotheses[0]]
        alternatives.append(others)
    answer: dict = {"translatedText": translated[0] if job.single else translated}
    if job.alternatives:
        answer["alternatives"] = alternatives[0] if job.single else alternatives
    if job.detected is not None:
        answer["detectedLanguage"] = {"confidence": 100.0, "language": job.detected}
    return answer


__all__ = ["FIELDS", "routes"]
