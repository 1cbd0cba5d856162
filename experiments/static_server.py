"""The baseline of ``bench_serve.py``: a completions server that batches statically around
``generate``, what a user would write today without the engine.

Command:  python experiments/static_server.py --model tests/data/hf_lm/llama --port 8001
          (bench_serve.py starts it itself)

It speaks the part of OpenAI's completions API the benchmark sends (``POST /v1/completions`` with
``prompt`` as one text, ``max_tokens``, ``stream``, ``stream_options.include_usage`` and the extra
field ``min_length``; ``GET /health``), on the same stack as ``jaxformer serve`` (Starlette on
uvicorn). Requests wait in a queue; whenever the decoder is free, everything waiting (up to
``--batch-size``) becomes one batch, decoded by one ``generate`` call on a worker thread while new
requests queue up. The batch runs until its longest request is done: ``max_length`` is the largest
``max_tokens`` in it (rounded up to a power of two, at least 8, so that there are few programs)
and ``min_length`` the largest ``min_length``; each output is then cut to its request's
``max_tokens``. Greedy search: each request's text is the one it gets alone (``generate``'s rows
are independent), the same text ``jaxformer serve`` gives it. The baseline at its best: shapes are
fixed (``--batch-size`` rows, prompts padded to ``--max-input-length``), every program is compiled
before ``/health`` says ready, so it never compiles while it is measured. A streamed request gets
its whole text in one event when its batch ends (``generate`` does not stream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import jaxformer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model", required=True, help="a Hugging Face decoder-only model directory")
    add("--port", type=int, default=8001)
    add("--batch-size", type=int, default=8, help="requests decoded together (default 8)")
    add("--max-input-length", type=int, default=32, help="the longest prompt in tokens")
    add("--max-tokens", type=int, default=64, help="the most new tokens a request may ask for")
    return parser.parse_args(argv)


def length_buckets(max_tokens: int) -> list[int]:
    """The ``max_length`` values a batch may run with: powers of two from 8, then ``max_tokens``."""
    return [m for m in (8 << i for i in range(16)) if m < max_tokens] + [max_tokens]


class StaticBatcher:
    """The queue and the decoding loop (one ``generate`` call per batch)."""

    def __init__(self, args):
        self.pre = jaxformer.load_pretrained(args.model)
        self.tokenizer = self.pre.target_tokenizer
        self.batch_size, self.width = args.batch_size, args.max_input_length
        self.buckets = length_buckets(args.max_tokens)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ready = False

    def decode(self, prompts: list[list[int]], max_tokens: int, min_length: int) -> list[list[int]]:
        """One batch: every prompt's new token ids (up to its end token)."""
        rows = len(prompts)
        padded = np.full([self.batch_size, self.width], self.pre.pad_id, np.int32)
        lengths = np.ones([self.batch_size], np.int32)
        for row, ids in enumerate(prompts):
            padded[row, : len(ids)], lengths[row] = ids, len(ids)
        max_length = next(m for m in self.buckets if m >= max_tokens)
        result = jaxformer.generate(
            self.pre.model, self.pre.params, padded, prompt_lengths=lengths,
            end_id=self.pre.end_id, max_length=max_length, min_length=min(min_length, max_length),
        )  # fmt: skip
        ids, ends = np.asarray(result.ids[:rows, 0]), np.asarray(result.lengths[:rows, 0])
        return [ids[r, : ends[r]].tolist() for r in range(rows)]

    async def warm_up(self) -> None:
        """Compile the program of every ``max_length`` bucket, then report ready."""
        for bucket in self.buckets:
            await asyncio.to_thread(self.decode, [[0]], bucket, 0)
        self.ready = True

    async def loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            prompts = [item[0] for item in batch]
            longest = max(item[1] for item in batch)
            least = max(item[2] for item in batch)
            try:
                outputs = await asyncio.to_thread(self.decode, prompts, longest, least)
            except Exception as error:  # every request of the batch fails with it
                for *_, future in batch:
                    future.set_exception(error)
                continue
            for (_, max_tokens, _, future), ids in zip(batch, outputs, strict=True):
                if not future.done():  # (its client may have left)
                    future.set_result(ids[:max_tokens])

    async def complete(self, prompt: list[int], max_tokens: int, min_length: int) -> list[int]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((prompt, max_tokens, min_length, future))
        return await future


def make_app(args) -> Starlette:
    batcher = StaticBatcher(args)

    async def completions(request: Request) -> Response:
        body = json.loads(await request.body())
        prompt = batcher.tokenizer.encode(body["prompt"])[: batcher.width]
        max_tokens = min(int(body.get("max_tokens") or batcher.buckets[-1]), batcher.buckets[-1])
        ids = await batcher.complete(prompt, max_tokens, int(body.get("min_length", 0)))
        text = batcher.tokenizer.decode(ids)
        reason = "length" if len(ids) >= max_tokens else "stop"
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids)}
        usage["total_tokens"] = usage["prompt_tokens"] + len(ids)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": "static"}  # fmt: skip
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
        if not body.get("stream"):
            return JSONResponse({**head, "choices": [choice], "usage": usage})
        events = [{**head, "choices": [choice]}]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**head, "choices": [], "usage": usage})
        lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
        return StreamingResponse(iter(lines), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return JSONResponse(
            {"status": "ok" if batcher.ready else "starting"}, 200 if batcher.ready else 503
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        warming = asyncio.create_task(batcher.warm_up())
        looping = asyncio.create_task(batcher.loop())
        yield
        for task in (warming, looping):
            task.cancel()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv=None) -> None:
    args = parse_args(argv)
    uvicorn.run(make_app(args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
