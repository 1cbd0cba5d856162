"""OpenAI's (legacy) completions API for decoder-only models: ``POST /v1/completions`` and
``GET /v1/models``, as the official ``openai`` client calls them (``client.completions.create``).

Fields (OpenAI's API reference, "Completions"):

- ``model``: the served model's name (``GET /v1/models``; the directory's name unless
  ``--served-model-name``); another is answered 404 (``model_not_found``);
- ``prompt``: a text, a list of texts, a list of token ids or a list of lists of them;
- ``max_tokens``: new tokens at most; without it, the server's default (the checkpoint's
  ``max_new_tokens`` or ``--max-length``), not OpenAI's 16; above the server's ``--max-length``: 400;
- ``temperature``, ``top_p``: a request that names neither is decoded with the server's default
  search (the command line's: greedy search unless ``--sampling-topk`` samples, or the
  checkpoint's sampling settings). Naming either follows OpenAI: ``temperature`` (default 1,
  at most 2) 0 is greedy search, above 0 samples at that temperature, from the engine's top-k
  (the whole vocabulary unless ``--sampling-topk k``) and within ``top_p`` (default 1);
- ``n``: choices per prompt: the n best hypotheses of a beam search, else n requests (sampling:
  choice j draws with ``seed + j``);
- ``seed``: the sampling seed; without one, each sampling request draws a fresh seed (unless the
  command line gave ``--seed``, which is then every request's default);
- ``stop``: up to 4 strings; a choice ends where its text first contains one, which is cut off
  (as ``generate``'s ``stop``). The engine watches no stop string: the server reads each choice's
  tokens as they come and cancels it at the first stop string (its slots go to the next request).
  Greedy search and sampling only (a beam search's text is known only at its end): with
  ``beam_size`` > 1, 400;
- ``stream``: server-sent events, ``data: {...}`` per piece of text, ``data: [DONE]`` at the end;
  ``stream_options: {"include_usage": true}`` adds a last chunk with ``usage``;
- ``echo``: the prompt's text before each choice's;
- ``user``: accepted and ignored; ``logprobs``, ``best_of``, ``suffix``, ``logit_bias``, and
  ``presence_penalty`` / ``frequency_penalty`` other than 0: not served, 400 naming them;
- extra fields named as in ``DecodeOptions``: ``beam_size``, ``length_penalty``, ``min_length``.

Answers are ``text_completion`` objects: ``choices[i]`` (``text``, ``index`` = prompt * n + choice,
``finish_reason`` "stop" (an end token or a stop string) or "length" (``max_tokens`` reached)),
``usage`` (prompt, completion and total tokens). Errors: ``{"error": {"message", "type", "param",
"code"}}`` as OpenAI's.
"""

from __future__ import annotations

import dataclasses

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxformer.serving.app import (
    ClientGone,
    EngineStopped,
    ServerState,
    busy_headers,
    read_body,
    until_disconnected,
)
from jaxformer.serving.choices import Choice, Job, answer
from jaxformer.serving.events import EventStream, events
from jaxformer.serving.requests import RequestError, decode_options

OPENAI = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
    "stream_options", "echo", "user", "logprobs", "best_of", "suffix", "logit_bias",
    "presence_penalty", "frequency_penalty",
}  # fmt: skip
EXTRA = ("beam_size", "length_penalty", "min_length")  # DecodeOptions fields
NOT_SERVED = {  # field -> the values that mean "off", which are accepted
    "logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
OPENAI_NAMES = {"max_length": "max_tokens", "sampling_temperature": "temperature"}


def routes(state: ServerState) -> list[Route]:
    name = state.served.name

    async def completions(request: Request) -> Response:
        try:
            state.check_admitting()
            job = _parse(state, await read_body(request))
            requests = len(job.choices) // (job.n if job.beam else 1)
            if job.stream:
                admission = state.admitted(requests, "prompt")
                admission.__enter__()  # released when the stream ends
                release = lambda: admission.__exit__(None, None, None)
                return EventStream(events(state, job), release, state.metrics.disconnects.inc)
            with state.admitted(requests, "prompt"):
                return JSONResponse(await until_disconnected(request, answer(state, job)))
        except RequestError as error:
            return _error(error)
        except EngineStopped as error:
            return _error(RequestError(str(error), status=503))
        except ClientGone:
            state.metrics.disconnects.inc()
            return Response(status_code=499)

    def card():
        return {"id": name, "object": "model", "created": 0, "owned_by": "jaxformer"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [card()]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != name:
            return _error(_unknown_model(request.path_params["model"], name))
        return JSONResponse(card())

    return [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
    ]


def _error(error: RequestError) -> Response:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    code = getattr(error, "code", None)
    body = {"message": error.message, "type": kind, "param": error.field, "code": code}
    return JSONResponse({"error": body}, error.status, headers=busy_headers(error))


def _unknown_model(given, name: str) -> RequestError:
    error = RequestError(
        f"the model {given!r} does not exist; this server serves {name!r}", "model", status=404
    )
    error.code = "model_not_found"
    return error


def _openai_words(error: RequestError) -> RequestError:
    """A refusal worded with OpenAI's names (``max_tokens``, ``temperature``)."""
    message, field = error.message, error.field
    for ours, theirs in OPENAI_NAMES.items():
        message = message.replace(ours, theirs)
        field = theirs if field == ours else field
    return RequestError(message, field, error.status)


def _number(body: dict, name: str, low: float, high: float):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"{name} must be a number in [{low}, {high}], got {value!r}", name)
    return float(value)


def _parse(state: ServerState, body: dict) -> Job:
    """The request's choices: one per prompt and ``n``, each with its search options."""
    served = state.served
    unknown = sorted(set(body) - OPENAI - set(EXTRA))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}", unknown[0])
    for field, off in NOT_SERVED.items():
        if body.get(field) not in off:
            raise RequestError(f"{field}: not served by jaxformer", field)
    if "model" not in body:
        raise RequestError("model is required (GET /v1/models lists it)", "model")
    if body["model"] != served.name:
        raise _unknown_model(body["model"], served.name)
    prompts = _prompts(state, body.get("prompt"))
    options = _search(state, body)
    n = body.get("n", 1)
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(f"n must be an int >= 1, got {n!r}", "n")
    beam = options.beam_size > 1
    if beam and n > options.beam_size:
        raise RequestError(f"n={n}: at most beam_size={options.beam_size} with beam search", "n")
    stops = _stops(body.get("stop"))
    if stops and beam:
        raise RequestError(
            "stop: served with greedy search and sampling only, not beam search", "stop"
        )
    sampling = options.sampling_topk != 1
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an int, got {seed!r}", "seed")
    seed = state.seed(seed) if sampling else options.seed
    choices = []
    for p, (ids, text) in enumerate(prompts):
        for j in range(n):
            o = dataclasses.replace(options, n_best=n) if beam else options
            if sampling:  # choice j of a sampling request draws with seed + j
                o = dataclasses.replace(o, seed=seed if beam else (seed + j) % 2**31)
            choices.append(Choice(p * n + j, ids, text, o))
    stream, echo, usage_chunk = _output(body)
    return Job(choices, stops, stream, usage_chunk, echo, beam, n)


def _search(state: ServerState, body: dict):
    """The request's ``DecodeOptions``: OpenAI's ``max_tokens``, ``temperature`` and ``top_p``
    and the extra fields over the server's defaults (the module docstring says how)."""
    given = {name: body[name] for name in EXTRA if name in body}
    if body.get("max_tokens") is not None:
        given["max_length"] = body["max_tokens"]
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if temperature is not None or top_p is not None:
        temperature = 1.0 if temperature is None else temperature
        if temperature == 0:
            given |= {"sampling_topk": 1}
        elif state.limits.sampling_topk is None:
            raise RequestError("temperature > 0: this server does not sample", "temperature")
        else:
            given |= {
                "sampling_topk": state.limits.sampling_topk,
                "sampling_temperature": temperature,
                "top_p": 1.0 if top_p is None else top_p,
            }
    try:
        return decode_options(state.served.defaults, given, state.limits)
    except RequestError as error:
        raise _openai_words(error) from None


def _output(body: dict) -> tuple[bool, bool, bool]:
    """``(stream, echo, include_usage)``."""
    stream, echo = body.get("stream") or False, body.get("echo") or False
    for name, value in (("stream", stream), ("echo", echo)):
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, got {value!r}", name)
    usage_chunk = False
    if body.get("stream_options") is not None:
        if not stream or not isinstance(body["stream_options"], dict):
            raise RequestError("stream_options: an object, with stream true", "stream_options")
        usage_chunk = bool(body["stream_options"].get("include_usage"))
    return stream, echo, usage_chunk


def _prompts(state: ServerState, prompt) -> list[tuple[list[int], str]]:
    """Each prompt's ids and text."""
    served = state.served
    if prompt is None:
        raise RequestError("prompt is required", "prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(_is_id(i) for i in prompt)
    ):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt must be a text, a list of texts or of token ids", "prompt")
    out = []
    vocab = state.engine.layout.adapter.inputs.vocab_size
    for i, item in enumerate(prompt):
        field = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids, text = served.source_ids(item), item
        elif isinstance(item, list) and all(_is_id(t) for t in item):
            if any(not 0 <= t < vocab for t in item):
                raise RequestError(f"{field}: token ids must be in [0, {vocab})", field)
            ids, text = list(item), served.text(item)
        else:
            raise RequestError(f"{field} must be a text or a list of token ids", field)
        if not ids:
            raise RequestError(f"{field} is empty: a language model needs a token", field)
        most = state.limits.max_input_length
        if len(ids) > most:
            raise RequestError(
                f"{field}: {len(ids)} tokens, more than this server's {most} (jaxformer serve "
                "--max-input-length)",
                field,
            )
        out.append((ids, text))
    return out


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > 4
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise RequestError("stop must be a non-empty text or a list of up to 4 of them", "stop")
    return tuple(stops)


__all__ = ["routes"]
