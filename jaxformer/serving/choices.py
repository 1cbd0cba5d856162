"""A completions request's choices through the engine (``completions.py`` reads the request):
each greedy or sampling choice is one engine request whose text is read as its tokens come
(``streams.TextStream``: stop strings end it early, its slots freed); the n choices of a beam
search are one request's n best. ``answer`` is the body of an answer not streamed (``events.py``
streams one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid

from jaxformer.serving.app import ServerState, result_of
from jaxformer.serving.streams import TextStream


@dataclasses.dataclass
class Choice:
    index: int
    prompt: list[int]
    prompt_text: str
    options: object


@dataclasses.dataclass
class Job:
    choices: list[Choice]
    stops: tuple[str, ...]
    stream: bool
    usage_chunk: bool
    echo: bool
    beam: bool  # one beam search per prompt gives its n choices
    n: int


@dataclasses.dataclass
class Done:
    index: int
    text: str
    finish_reason: str
    tokens: int


async def decode_choices(state: ServerState, job: Job, emit=None) -> list[Done]:
    """Decode every choice; ``emit(index, piece)`` (streaming) is awaited with each new piece of
    text. The engine requests are cancelled if this is."""
    served, tasks, handles = state.served, [], []
    try:
        if job.beam:
            for first in range(0, len(job.choices), job.n):
                group = job.choices[first : first + job.n]
                handles.append(state.submit(group[0].prompt, group[0].options, "prompt"))
                tasks.append(asyncio.ensure_future(_beam(state, handles[-1], group, emit)))
        else:
            for choice in job.choices:
                handles.append(state.submit(choice.prompt, choice.options, "prompt"))
                stream = TextStream(served.text, job.stops)
                follow = _follow(state, handles[-1], choice, stream, emit)
                tasks.append(asyncio.ensure_future(follow))
        done = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:  # (a no-op for those that finished)
            handle.cancel()
    return [d for group in done for d in group]


async def _follow(state, handle, choice: Choice, stream: TextStream, emit) -> list[Done]:
    """A greedy or sampling choice: its text as its tokens come, stopped at a stop string."""
    try:
        async with contextlib.aclosing(handle.atokens()) as arriving:
            async for tokens in arriving:
                piece = stream.push(tokens)
                if piece and emit is not None:
                    await emit(choice.index, piece)
                if stream.stopped:
                    handle.cancel()
                    break
        if stream.stopped:
            reason = "stop"
        else:
            result = await result_of(handle)
            reason = "length" if result.lengths[0, 0] >= choice.options.max_length else "stop"
        rest = stream.finish()
        if rest and emit is not None:
            await emit(choice.index, rest)
    finally:
        handle.cancel()
    state.metrics.output_tokens.inc(len(stream.tokens))
    return [Done(choice.index, stream.text, reason, len(stream.tokens))]


async def _beam(state, handle, group: list[Choice], emit) -> list[Done]:
    """A beam search's n best hypotheses: the choices of one prompt."""
    try:
        result = await result_of(handle)
    finally:
        handle.cancel()
    out = []
    for rank, choice in enumerate(group):
        length = int(result.lengths[0, rank])
        text = state.served.text(result.ids[0, rank, :length])
        reason = "length" if length >= choice.options.max_length else "stop"
        if emit is not None:
            await emit(choice.index, text)
        out.append(Done(choice.index, text, reason, length))
    state.metrics.output_tokens.inc(sum(d.tokens for d in out))
    return out


def header(state: ServerState) -> dict:
    """The fields every answer (every chunk of a stream) starts with: a fresh id."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.served.name,
    }


def usage(job: Job, done: list[Done]) -> dict:
    prompts = {c.index // job.n: len(c.prompt) for c in job.choices}
    prompt_tokens, completion = sum(prompts.values()), sum(d.tokens for d in done)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


async def answer(state: ServerState, job: Job) -> dict:
    done = await decode_choices(state, job)
    texts = {c.index: c.prompt_text if job.echo else "" for c in job.choices}
    choices = [
        {"text": texts[d.index] + d.text, "index": d.index, "logprobs": None,
         "finish_reason": d.finish_reason}
        for d in sorted(done, key=lambda d: d.index)
    ]  # fmt: skip
    head = header(state)
    return {**head, "choices": choices, "usage": usage(job, done)}


__all__ = ["Choice", "Done", "Job", "answer", "decode_choices", "header", "usage"]
