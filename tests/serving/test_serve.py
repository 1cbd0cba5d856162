"""``jaxformer serve`` as its users drive it: a server subprocess on a free localhost port, spoken to
with LibreTranslate's client (``libretranslatepy``), OpenAI's (``openai``) and ``httpx``.

One server per model kind for the whole module (NLLB for translation, Llama for completions), each
in its own xdist group, so the two start and compile side by side. Every answer is compared with
the offline one (``pre.translate`` / ``pre.generate`` of the same fixture and options). The
Llama server's last test sends it SIGTERM under load.
"""

import asyncio
import functools
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import jaxformer
from jaxformer.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
NLLB, LLAMA = ROOT / "tests/data/hf/nllb", ROOT / "tests/data/hf_lm/llama"
TRANSLATION = pytest.mark.xdist_group("serve_translation")
LM = pytest.mark.xdist_group("serve_lm")
STARTUP = 240  # seconds a server may take to load and compile


# The servers.
class Server:
    """A ``jaxformer serve`` subprocess on a free port, ready (``/health`` 200) once made."""

    def __init__(self, log: Path, *args: str):
        with socket.socket() as probe:  # a free port (released just before the server takes it)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        argv = [sys.executable, "-m", "jaxformer.cli", "serve", *args, "--port", str(self.port)]
        with log.open("w") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.before_ready = []  # (status, body) of the /health answers before the first 200
        deadline = time.monotonic() + STARTUP
        while True:
            assert self.process.poll() is None, f"the server exited:\n{log.read_text()}"
            try:
                health = httpx.get(f"{self.url}/health", timeout=5)
                if health.status_code == 200:
                    break
                self.before_ready.append((health.status_code, health.json()))
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in {STARTUP} s:\n{log.read_text()}"
            time.sleep(0.1)

    def metric(self, name: str) -> float:
        """A sample's value in ``/metrics`` (``name`` with its labels), 0 if absent."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def translation(tmp_path_factory):
    server = Server(
        tmp_path_factory.mktemp("serve-nllb") / "server.log",
        *("--model", str(NLLB), "--max-input-length", "32", "--max-length", "128"),
        *("--slots", "4", "--beam-widths", "4", "--queue-size", "11"),
    )  # capacity: 4 + 1 groups + 11 waiting = 16 requests
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    server = Server(
        tmp_path_factory.mktemp("serve-llama") / "server.log",
        *("--model", str(LLAMA), "--max-input-length", "32", "--max-length", "160"),
        *("--slots", "4", "--beam-widths", "4", "--queue-size", "16"),
    )
    yield server
    server.stop()


# The offline answers.
@functools.cache
def nllb():
    return jaxformer.load_pretrained(NLLB)


@functools.cache
def llama():
    return jaxformer.load_pretrained(LLAMA)


SOURCES = tuple(json.loads((NLLB / "goldens.json").read_text())["sources"])
PROMPTS = tuple(p["text"] for p in json.loads((LLAMA / "goldens.json").read_text())["prompts"])


@functools.cache
def translated(lines: tuple, **options) -> list:
    pre = nllb()
    o = pre.decode_options("fra_Latn", **{"max_length": 128, **options})
    return pre.translate(list(lines), o, source_lang="eng_Latn", target_lang="fra_Latn")


@functools.cache
def continued(prompts: tuple, **options) -> list:
    pre = llama()
    return pre.generate(list(prompts), pre.decode_options(**{"max_length": 160, **options}))


def post(server: Server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60, **kw)


# Translation: LibreTranslate's API.
@TRANSLATION
def test_health_is_503_while_compiling_then_200(translation):
    assert translation.before_ready, "/health answered 200 at once: nothing was compiled first?"
    for status, body in translation.before_ready:
        assert (status, body["status"]) == (503, "starting")
    health = httpx.get(f"{translation.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


@TRANSLATION
def test_concurrent_libretranslate_requests_each_get_the_offline_translation(translation):
    from libretranslatepy import LibreTranslateAPI

    client = LibreTranslateAPI(translation.url)  # forms, as LibreTranslate's clients send them
    lines = SOURCES[:12]
    answers = [None] * len(lines)

    def ask(i):
        answers[i] = client.translate(lines[i], "en", "fr", timeout=60)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(lines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [o.texts[0] for o in translated(lines)]

    # A list in one request, NLLB's codes, beam search with its options as extra fields.
    lines = SOURCES[12:20]
    body = {"q": list(lines), "source": "eng_Latn", "target": "fra_Latn", "api_key": "ignored"}
    got = post(translation, "/translate", body | {"beam_size": 4, "length_penalty": 0.6})
    want = translated(lines, beam_size=4, length_penalty=0.6)
    assert got.json() == {"translatedText": [o.texts[0] for o in want]}


@TRANSLATION
def test_alternatives_are_the_next_hypotheses_of_the_beam(translation):
    line = SOURCES[20]
    got = post(
        translation, "/translate", {"q": line, "source": "en", "target": "fr", "alternatives": 2}
    )
    (want,) = translated((line,), beam_size=4, n_best=3)  # the narrowest beam the server has
    others = [t for t in dict.fromkeys(want.texts[1:]) if t != want.texts[0]]
    assert got.json() == {"translatedText": want.texts[0], "alternatives": others}


@TRANSLATION
def test_html_keeps_the_tags_and_translates_the_text_between(translation):
    a, b = SOURCES[21], SOURCES[22]
    q = f"<p>{a} <b>{b}</b><script>{b}</script></p>"
    got = post(
        translation, "/translate", {"q": q, "source": "en", "target": "fr", "format": "html"}
    )
    ta, tb = (o.texts[0] for o in translated((a, b)))
    assert got.json()["translatedText"] == f"<p>{ta} <b>{tb}</b><script>{b}</script></p>"


@TRANSLATION
def test_languages_as_libretranslate_lists_them(translation):
    from libretranslatepy import LibreTranslateAPI

    languages = {entry["code"]: entry for entry in LibreTranslateAPI(translation.url).languages()}
    assert languages["en"]["name"] == "English" and "fr" in languages["en"]["targets"]
    assert "ace_Arab" in languages  # NLLB codes without an ISO 639-1 code are listed as they are
    empty = post(translation, "/translate", {"q": ["", SOURCES[0]], "source": "en", "target": "fr"})
    assert empty.json()["translatedText"] == ["", translated((SOURCES[0],))[0].texts[0]]


@TRANSLATION
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"q": "ru mi", "source": ', "JSON"),
        ({"q": "ru mi", "source": "en", "target": "fr", "beam_sise": 4}, "'beam_sise'"),
        ({"q": "ru mi", "source": "en"}, "target"),
        ({"q": [], "source": "en", "target": "fr"}, "q"),
        ({"q": "ru mi", "source": "en", "target": "fr", "beam_size": 0}, "beam_size"),
        ({"q": "ru mi", "source": "en", "target": "fr", "beam_size": 3}, "beam_size"),
        ({"q": "ru mi", "source": "en", "target": "fr", "max_length": 500}, "max_length"),
        ({"q": "ru mi", "source": "en", "target": "fr", "length_penalty": 0.6}, "length_penalty"),
        ({"q": "ru mi", "source": "en", "target": "fr", "sampling_topk": 0}, "sampling_topk"),
        ({"q": "ru mi", "source": "en", "target": "fr", "top_p": 2}, "top_p"),
        ({"q": ["ru mi", "ru " * 40], "source": "en", "target": "fr"}, "q[1]: 4"),
        ({"q": "ru mi", "source": "en", "target": "xx"}, "target"),
        ({"q": "ru mi", "source": "auto", "target": "fr"}, "source"),
        ({"q": "ru mi", "source": "en", "target": "en"}, "target"),
        ({"q": "ru mi", "source": "en", "target": "fr", "format": "pdf"}, "format"),
        ({"q": "ru mi", "source": "en", "target": "fr", "alternatives": 4}, "alternatives"),
        ({"q": ["ru"] * 17, "source": "en", "target": "fr"}, "q: 17 inputs"),
    ],
)  # fmt: skip
def test_bad_requests_get_400_naming_the_field(translation, body, field):
    got = post(translation, "/translate", body)
    assert got.status_code == 400, got.text
    assert field in got.json()["error"]


@TRANSLATION
def test_a_full_queue_answers_503_with_retry_after(translation):
    """16 beam searches that run all their 64 steps fill the server (4 + 1 groups and 11 places
    in the queue, one beam group): another request is refused at once, not queued."""

    async def scenario():
        async with httpx.AsyncClient(base_url=translation.url, timeout=120) as client:
            long = {"beam_size": 4, "min_length": 63, "max_length": 64}
            body = {"q": list(SOURCES[:16]), "source": "en", "target": "fr", **long}
            holding = asyncio.ensure_future(client.post("/translate", json=body))
            while not translation.metric('jaxformer_slots_busy{width="4"}'):
                await asyncio.sleep(0.02)
            refused = await client.post(
                "/translate", json={"q": "ru", "source": "en", "target": "fr"}
            )
            return refused, await holding

    refusals = 'jaxformer_http_requests_total{code="503",route="/translate"}'
    before = translation.metric(refusals)
    refused, held = asyncio.run(scenario())
    assert translation.metric(refusals) == before + 1
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "busy" in refused.json()["error"]
    assert held.status_code == 200 and len(held.json()["translatedText"]) == 16


@TRANSLATION
def test_metrics_count_requests_tokens_and_errors(translation):
    names = [
        'jaxformer_http_requests_total{code="200",route="/translate"}',
        'jaxformer_http_requests_total{code="400",route="/translate"}',
        'jaxformer_decode_requests_total{width="1"}',
        "jaxformer_input_tokens_total",
        "jaxformer_output_tokens_total",
    ]
    before = [translation.metric(name) for name in names]
    ok = post(translation, "/translate", {"q": ["ru mi", "ka"], "source": "en", "target": "fr"})
    assert ok.status_code == 200
    assert post(translation, "/translate", {"q": "ru", "source": "en"}).status_code == 400
    grown = [translation.metric(name) - b for name, b in zip(names, before, strict=True)]
    assert grown[:3] == [1, 1, 2] and grown[3] > 0 and grown[4] > 0, grown
    text = httpx.get(f"{translation.url}/metrics").text
    assert "# TYPE jaxformer_request_seconds histogram" in text
    assert translation.metric('jaxformer_slots{width="4"}') == 4
    assert translation.metric('jaxformer_slots{width="1"}') == 4
    assert "jaxformer_queue_length 0.0" in text


@TRANSLATION
def test_the_readme_serving_examples_run(translation, capsys):
    """The curl and libretranslatepy examples, against this module's server (the README's flags
    parse; its --max-length and --slots differ from the README's, not the answers)."""
    section = readme_section("Serve a model")
    commands = re.findall(r"^(jaxformer serve .*?)\s+#", section, re.M)
    assert len(commands) == 2
    for command in commands:
        build_parser().parse_args(command.split()[1:])
    (curl,) = re.findall(r"^curl .*?\}'$", section, re.M | re.S)
    if shutil.which("curl"):
        done = subprocess.run(
            ["bash", "-c", curl.replace(":5000", f":{translation.port}")],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        answer = json.loads(done.stdout)
    else:  # no curl here: its body through httpx
        answer = post(translation, "/translate", json.loads(curl.split("-d '")[1][:-1])).json()
    (want,) = translated((SOURCES[0],), beam_size=4)
    assert answer == {"translatedText": want.texts[0]}
    code = next(b for b in python_blocks(section) if "libretranslatepy" in b)
    exec(compile(code.replace(":5000", f":{translation.port}"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == translated((SOURCES[0],))[0].texts[0]


# Completions: OpenAI's API.
def openai_client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@LM
def test_concurrent_completions_each_get_the_offline_continuation(lm):
    client = openai_client(lm)
    answers = [None] * len(PROMPTS)

    def ask(i):
        answers[i] = client.completions.create(model="llama", prompt=PROMPTS[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    want = continued(PROMPTS)
    assert [a.choices[0].text for a in answers] == [o.texts[0] for o in want]
    assert all(a.choices[0].finish_reason == "stop" for a in answers)
    ids = llama().target_tokenizer.encode(PROMPTS[0])
    assert answers[0].usage.prompt_tokens == len(ids)

    # Several prompts and beam search's n best in one request; seeded sampling; echo.
    got = client.completions.create(
        model="llama", prompt=list(PROMPTS[:3]), n=2, extra_body={"beam_size": 4}
    )
    want = continued(PROMPTS[:3], beam_size=4, n_best=2)
    assert [c.text for c in got.choices] == [t for o in want for t in o.texts]
    assert [c.index for c in got.choices] == list(range(6))
    got = client.completions.create(
        model="llama", prompt=PROMPTS[0], temperature=1.5, top_p=0.9, seed=7, max_tokens=12
    )
    (want,) = continued(
        PROMPTS[:1], sampling_topk=0, sampling_temperature=1.5, top_p=0.9, seed=7, max_length=12
    )
    assert got.choices[0].text == want.texts[0]
    got = client.completions.create(model="llama", prompt=PROMPTS[1], echo=True, temperature=0)
    assert got.choices[0].text == PROMPTS[1] + continued(PROMPTS[1:2])[0].texts[0]


@LM
def test_streaming_gives_the_text_of_the_answer_not_streamed(lm):
    client = openai_client(lm)
    for prompt, extra in [(PROMPTS[2], {}), (PROMPTS[3], {"stop": [" lo"]}), (PROMPTS[4], {"max_tokens": 3})]:  # fmt: skip
        whole = client.completions.create(model="llama", prompt=prompt, **extra)
        chunks = list(
            client.completions.create(
                model="llama", prompt=prompt, stream=True, stream_options={"include_usage": True},
                **extra,
            )
        )  # fmt: skip
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert text == whole.choices[0].text
        assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) <= {None}
        assert chunks[-1].usage == whole.usage
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 3


@LM
def test_stop_strings_cut_the_text_as_generate_does(lm):
    client = openai_client(lm)
    stops = [" ne", " re"]
    got = client.completions.create(model="llama", prompt=list(PROMPTS[:8]), stop=stops)
    want = continued(PROMPTS[:8], stop=tuple(stops))
    assert [c.text for c in got.choices] == [o.texts[0] for o in want]
    assert any(
        c.finish_reason == "stop" and c.text != o.texts[0]
        for c, o in zip(got.choices, continued(PROMPTS[:8]), strict=True)
    )


@LM
@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "lo", "max_tokens": 161}, 400, "max_tokens"),
        ({"prompt": "lo " * 40}, 400, "prompt"),
        ({"prompt": ["lo", "lo " * 40]}, 400, "prompt[1]"),
        ({"prompt": "lo", "temperature": 2.5}, 400, "temperature"),
        ({"prompt": "lo", "top_p": -1}, 400, "top_p"),
        ({"prompt": "lo", "n": 5, "beam_size": 4}, 400, "n"),
        ({"prompt": "lo", "stop": "x", "beam_size": 4}, 400, "stop"),
        ({"prompt": "lo", "beam_size": 3}, 400, "beam_size"),
        ({"prompt": "lo", "logprobs": 2}, 400, "logprobs"),
        ({"prompt": "lo", "frobnicate": True}, 400, "frobnicate"),
        ({"prompt": "lo", "model": "gpt-4"}, 404, "model"),
        ({"prompt": [[1, 100000]]}, 400, "prompt"),
        ({}, 400, "prompt"),
    ],
)  # fmt: skip
def test_bad_completions_get_openais_error_naming_the_field(lm, body, status, param):
    got = post(lm, "/v1/completions", {"model": "llama", **body})
    assert got.status_code == status, got.text
    assert got.json()["error"]["param"] == param
    assert got.json()["error"]["type"] == "invalid_request_error"
    bad = post(lm, "/v1/completions", "{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]


@LM
def test_a_client_that_disconnects_frees_its_slots(lm):
    disconnects = lm.metric("jaxformer_client_disconnects_total")
    tokens = lm.metric("jaxformer_output_tokens_total")
    body = {"model": "llama", "prompt": PROMPTS[0], "max_tokens": 160, "min_length": 160}
    with httpx.stream("POST", f"{lm.url}/v1/completions", json=body | {"stream": True}) as stream:
        next(stream.iter_lines())  # the first piece of text: the request is decoding; then leave
    # Not streamed: the client gives up before the answer.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{lm.url}/v1/completions", json={**body, "n": 16}, timeout=0.15)
    deadline = time.monotonic() + 30
    while lm.metric("jaxformer_client_disconnects_total") < disconnects + 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while lm.metric('jaxformer_slots_busy{width="1"}'):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Each choice's tokens are counted when it ends: not all of the 17 choices did.
    assert lm.metric("jaxformer_output_tokens_total") < tokens + 17 * 160


@LM
def test_models_health_and_metrics(lm):
    models = openai_client(lm).models.list()
    assert [m.id for m in models.data] == ["llama"]
    assert httpx.get(f"{lm.url}/health").json() == {"status": "ok", "model": "llama"}
    names = [
        'jaxformer_decode_requests_total{width="4"}',
        'jaxformer_http_requests_total{code="404",route="/v1/completions"}',
    ]
    before = [lm.metric(name) for name in names]
    body = {"model": "llama", "prompt": PROMPTS[0], "max_tokens": 4, "beam_size": 4}
    assert post(lm, "/v1/completions", body).status_code == 200
    assert post(lm, "/v1/completions", body | {"model": "gpt-4"}).status_code == 404
    assert [lm.metric(name) - b for name, b in zip(names, before, strict=True)] == [1, 1]


@LM
def test_the_readme_openai_example_runs(lm, capsys):
    code = next(b for b in python_blocks(readme_section("Serve a model")) if "openai" in b)
    exec(compile(code.replace(":8000", f":{lm.port}"), "README.md", "exec"), {})
    first, streamed, end = capsys.readouterr().out.split("\n")
    assert first == streamed == continued(PROMPTS[:1], max_length=20)[0].texts[0] and end == ""


@LM
def test_sigterm_finishes_the_requests_in_flight_refuses_new_ones_and_exits_0(lm):
    """Last: the server is gone after it."""
    long = {"model": "llama", "min_length": 150, "max_tokens": 160}
    prompts = list(PROMPTS[:10])

    async def scenario():
        async with httpx.AsyncClient(base_url=lm.url, timeout=120) as client:
            plain = [
                asyncio.ensure_future(client.post("/v1/completions", json=long | {"prompt": p}))
                for p in prompts[:8]
            ]  # 9 greedy requests on 4 slots: 3 rounds of 160 steps
            beam = asyncio.ensure_future(
                client.post("/v1/completions", json=long | {"prompt": prompts[8], "beam_size": 4})
            )
            streamed = asyncio.ensure_future(stream(client, long | {"prompt": prompts[9]}))
            while lm.metric("jaxformer_http_requests_in_flight") < 11:  # (this scrape is one)
                await asyncio.sleep(0.02)
            lm.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            refused = await client.post("/v1/completions", json=long | {"prompt": "lo"})
            health = await client.get("/health")
            return await asyncio.gather(*plain, beam, streamed), refused, health

    async def stream(client, body):
        async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            return [line async for line in r.aiter_lines() if line]

    (*answers, streamed), refused, health = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert health.status_code == 503 and health.json()["status"] == "draining"
    options = dict(min_length=150, max_length=160)
    want = [o.texts[0] for o in continued(tuple(prompts), **options)]
    assert [a.json()["choices"][0]["text"] for a in answers[:8]] == want[:8]
    (beam,) = continued(tuple(prompts[8:9]), beam_size=4, **options)
    assert answers[8].json()["choices"][0]["text"] == beam.texts[0]
    assert streamed[-1] == "data: [DONE]"
    pieces = [json.loads(line[6:])["choices"][0]["text"] for line in streamed[:-1]]
    assert "".join(pieces) == want[9]
    assert lm.process.wait(60) == 0
    log = lm.log.read_text().splitlines()
    assert any("drained" in line for line in log)
    # One line per HTTP request (uvicorn's access log) and a few of the server's; none per token.
    assert len([line for line in log if "HTTP/1.1" not in line]) < 20, "\n".join(log)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)
