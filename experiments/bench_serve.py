"""``jaxformer serve`` under an open-loop load vs a server that batches statically (issue 28).

Command:  python experiments/bench_serve.py            (5 rates x 30 s x 2 servers: ~6 min)
          python experiments/bench_serve.py --smoke    (one short rate, small shapes: < 30 s)

Servers, each a subprocess on a free localhost port, started together (their start-ups overlap)
and measured one after the other (the other one idle), on the same model (``--model``, a Hugging Face decoder-only directory; default the tiny trained Llama
test fixture) and the same shapes:
- ``engine``: ``jaxformer serve --slots S --max-length T --max-input-length P`` (the continuous-
  batching engine; ``--queue-size`` large: nothing is refused);
- ``static``: ``experiments/static_server.py`` (a batch of up to S waiting requests per
  ``generate`` call, run until its longest request is done; its docstring says how it is kept at
  its best).

Load. Open loop: arrivals are a Poisson process at each rate of ``--rates`` (requests per second)
for ``--duration`` seconds, sent whatever the answers (a slow server gets a growing backlog, as in
production, and its latency shows it). The same seed gives both servers the same arrivals,
prompts and lengths. Each request is one prompt (drawn from the model directory's
``goldens.json`` prompts, else a short English list) with ``max_tokens`` drawn log-uniformly from
[4, ``--max-tokens``]; by default it also asks for ``min_length = max_tokens`` (the extra field),
so its output is exactly that long, as LLM serving benchmarks ignore EOS (``--natural-ends``: it
ends at the model's end token). Half the requests (``--stream-fraction``) are streamed (OpenAI's
``stream: true``). Before the rates, an untimed warm-up sends bursts of 1, 2, 4, ... S requests.

Reported per server and rate: requests completed and refused, throughput (requests/s and output
tokens/s over the time from the first arrival to the last answer), latency p50 / p95 (arrival to
last byte), time to first token p50 / p95 (streamed requests: arrival to the first event with
text), and the fraction of answers whose text equals the static server's (greedy search: 1.0).
The load generator (httpx, asyncio) runs on the same machine as the server: on a small machine it
takes CPU from it; the load averages are recorded.

Writes ``experiments/results/bench_serve.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import pathlib
import socket
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py

import httpx
import numpy as np
from common import load_average, machine_info, markdown_table, output_dir, write_json

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "tests" / "data" / "hf_lm" / "llama"
PROMPTS = ("The weather today is", "Once upon a time", "The capital of France is", "I think that")
STARTUP = 300  # seconds a server may take to load and compile


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--smoke", action="store_true", help="one short rate, small shapes (< 30 s)")
    add("--model", default=str(DEFAULT_MODEL), help="a Hugging Face decoder-only directory")
    add("--rates", type=float, nargs="+", default=[2, 4, 8, 16, 32], help="requests per second")
    add("--duration", type=float, default=30, help="seconds of arrivals per rate (default 30)")
    add("--slots", type=int, default=8, help="engine slots / static batch size (default 8)")
    add("--max-tokens", type=int, default=64, help="the longest output asked (default 64)")
    add("--max-input-length", type=int, default=32, help="the longest prompt (default 32)")
    add("--natural-ends", action="store_true", help="outputs end at the end token, too")
    add("--stream-fraction", type=float, default=0.5)
    add("--systems", nargs="+", default=["engine", "static"], choices=["engine", "static"])
    add("--seed", type=int, default=0)
    add("--out-dir", default=None)
    add("--tag", default="")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rates, args.duration, args.slots = [8.0], 1.0, 4
        args.max_tokens, args.max_input_length = 16, 16
    return args


# --- the servers ----------------------------------------------------------------------------------


class Launched:
    """A server subprocess on a free port, ready (``/health`` 200) once made."""

    def __init__(self, name: str, argv: list[str], log: pathlib.Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.name, self.url, self.log = name, f"http://127.0.0.1:{self.port}", log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*argv, "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )

    def wait_ready(self) -> float:
        """Seconds until ``/health`` says 200."""
        start = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            if time.monotonic() - start > STARTUP:
                raise RuntimeError(f"{self.name} not ready in {STARTUP} s:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def launch(system: str, args, log_dir: pathlib.Path) -> Launched:
    shape = ["--max-input-length", str(args.max_input_length)]
    if system == "engine":
        argv = [sys.executable, "-m", "jaxformer.cli", "serve", "--model", args.model, *shape]
        argv += ["--slots", str(args.slots), "--max-length", str(args.max_tokens)]
        argv += ["--queue-size", "100000", "--log-level", "warning"]
    else:
        argv = [sys.executable, str(ROOT / "experiments" / "static_server.py")]
        argv += ["--model", args.model, *shape, "--batch-size", str(args.slots)]
        argv += ["--max-tokens", str(args.max_tokens)]
    return Launched(system, argv, log_dir / f"{system}.log")


# --- the load -------------------------------------------------------------------------------------


def prompts_of(model: str) -> list[str]:
    goldens = pathlib.Path(model) / "goldens.json"
    if goldens.is_file():
        found = [p["text"] for p in json.loads(goldens.read_text()).get("prompts", [])]
        if found:
            return found
    return list(PROMPTS)


def model_name(args) -> str:
    """The name ``jaxformer serve`` gives the model (the static server takes any)."""
    return pathlib.Path(args.model).name


def schedule(args, rate: float, rng: np.random.Generator, prompts: list[str]) -> list[dict]:
    """Open-loop arrivals over ``args.duration`` seconds: each request's time and body."""
    requests, t = [], rng.exponential(1 / rate)
    while t < args.duration:
        tokens = round(math.exp(rng.uniform(math.log(4), math.log(args.max_tokens))))
        body = {"model": model_name(args), "prompt": prompts[rng.integers(len(prompts))]}
        body |= {"max_tokens": tokens, "temperature": 0}
        if not args.natural_ends:
            body["min_length"] = tokens
        if rng.uniform() < args.stream_fraction:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        requests.append({"at": t, "body": body})
        t += rng.exponential(1 / rate)
    return requests


async def one(client: httpx.AsyncClient, body: dict, sent: float) -> dict:
    """A request's record: status, latency, time to first text (streams), tokens, text."""
    record = {
        "status": 0,
        "stream": bool(body.get("stream")),
        "ttft": None,
        "tokens": 0,
        "text": "",
    }
    try:
        if not body.get("stream"):
            response = await client.post("/v1/completions", json=body)
            record["status"] = response.status_code
            if response.status_code == 200:
                answer = response.json()
                record["text"] = answer["choices"][0]["text"]
                record["tokens"] = answer["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                record["status"] = response.status_code
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        record["tokens"] = event["usage"]["completion_tokens"]
                    text = "".join(c["text"] for c in event.get("choices", []))
                    if text and record["ttft"] is None:
                        record["ttft"] = time.perf_counter() - sent
                    record["text"] += text
    except httpx.HTTPError as error:
        record["error"] = repr(error)
    record["latency"] = time.perf_counter() - sent
    return record


async def open_loop(url: str, requests: list[dict]) -> tuple[list[dict], float]:
    """Send every request at its time (not waiting for answers); the records and the seconds from
    the first arrival to the last answer."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start, tasks = time.perf_counter(), []
        for request in requests:
            await asyncio.sleep(max(0.0, start + request["at"] - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(client, request["body"], time.perf_counter())))
        records = await asyncio.gather(*tasks)
        end = time.perf_counter()
    first = requests[0]["at"] if requests else 0.0
    return list(records), end - start - first


def warm_up(url: str, args, prompts: list[str]) -> None:
    """Bursts of 1, 2, 4, ... slots requests at once (untimed): the programs a load needs."""
    size = 1
    while size <= args.slots:
        body = {"model": model_name(args), "max_tokens": args.max_tokens, "temperature": 0}
        burst = [
            {"at": 0.0, "body": body | {"prompt": prompts[i % len(prompts)]}} for i in range(size)
        ]
        asyncio.run(open_loop(url, burst))
        size *= 2


def summary(records: list[dict], seconds: float) -> dict:
    done = [r for r in records if r["status"] == 200 and "error" not in r]
    latency = [r["latency"] for r in done]
    ttft = [r["ttft"] for r in done if r["stream"] and r["ttft"] is not None]
    pct = lambda xs, p: float(np.percentile(xs, p)) if xs else float("nan")
    return dict(
        requests=len(records), completed=len(done), refused=len(records) - len(done),
        seconds=seconds, requests_per_s=len(done) / seconds,
        tokens_per_s=sum(r["tokens"] for r in done) / seconds,
        latency_p50=pct(latency, 50), latency_p95=pct(latency, 95),
        ttft_p50=pct(ttft, 50), ttft_p95=pct(ttft, 95), streams=len(ttft),
    )  # fmt: skip


# --- the benchmark --------------------------------------------------------------------------------


def run(args) -> dict:
    out = output_dir(args.out_dir, args.smoke, "bench_serve")
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompts_of(args.model)
    loads, rows, texts = [load_average()], [], {}
    servers = {system: launch(system, args, out) for system in args.systems}  # start together
    try:
        startup = {system: server.wait_ready() for system, server in servers.items()}
        for system, server in servers.items():  # measured one after the other
            warm_up(server.url, args, prompts)
            for rate in args.rates:
                rng = np.random.default_rng([args.seed, int(rate * 1000)])
                arrivals = schedule(args, rate, rng, prompts)
                records, seconds = asyncio.run(open_loop(server.url, arrivals))
                texts[system, rate] = [r["text"] for r in records]
                rows.append(dict(system=system, rate=rate, **summary(records, seconds)))
                loads.append(load_average())
                print(f"  {system} at {rate:g}/s: done", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    for row in rows:
        static = texts.get(("static", row["rate"]))
        if static is not None:
            same = [a == b for a, b in zip(texts[row["system"], row["rate"]], static, strict=True)]
            row["same_text_as_static"] = float(np.mean(same)) if same else float("nan")
    report = dict(
        machine=machine_info(packages=("uvicorn", "starlette", "httpx")), args=vars(args),
        startup_s=startup, loads=loads, rows=rows,
    )  # fmt: skip
    write(report, args, out)
    return report


def write(report: dict, args, out: pathlib.Path) -> None:
    name = f"bench_serve{'_' + args.tag if args.tag else ''}"
    write_json(out / f"{name}.json", report)
    ms = lambda s: f"{1000 * s:.0f}" if s == s else "-"  # (NaN: no such request)
    table = markdown_table(
        ["rate /s", "server", "done", "refused", "req/s", "tokens/s", "p50 ms", "p95 ms",
         "TTFT p50 ms", "TTFT p95 ms", "= static"],
        "rlrrrrrrrrr",
        [
            (f"{r['rate']:g}", r["system"], r["completed"], r["refused"],
             f"{r['requests_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", ms(r["latency_p50"]),
             ms(r["latency_p95"]), ms(r["ttft_p50"]), ms(r["ttft_p95"]),
             f"{r.get('same_text_as_static', float('nan')):.3f}")
            for r in sorted(report["rows"], key=lambda r: (r["rate"], r["system"]))
        ],
    )  # fmt: skip
    m = report["machine"]
    text = [
        "# jaxformer serve (continuous batching) vs a static-batching server",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs; load averages: {report['loads']}.",
        f"Model: {args.model}; {args.slots} slots / batch size, prompts up to "
        f"{args.max_input_length} tokens, outputs of 4 to {args.max_tokens} tokens "
        f"({'ending at the end token too' if args.natural_ends else 'exactly as asked'}); "
        f"{args.duration:g} s of Poisson arrivals per rate; {args.stream_fraction:.0%} streamed. "
        f"Start-up to ready, both starting at once (s): {report['startup_s']}.",
        "",
        *table,
        "",
        "`python experiments/bench_serve.py` wrote this (its docstring has the protocol).",
    ]
    (out / f"{name}.md").write_text("\n".join(text) + "\n")
    print("\n".join(table))
    print(f"wrote {out / name}.md and .json")


if __name__ == "__main__":
    run(parse_args())
