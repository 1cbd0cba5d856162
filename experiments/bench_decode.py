"""Decoding speed side by side: jaxformer vs CTranslate2 (float32, int8) vs HuggingFace PyTorch.

Command:  python experiments/bench_decode.py            (7 rounds: about 10 minutes on 2 CPU cores)
          python experiments/bench_decode.py --scaling  (adds the N / batch / beam scaling tables, about 2 minutes)
          python experiments/bench_decode.py --smoke    (tiny sizes, a few seconds, into a temp dir)
Needs:    pip install '.[bench]'  (CTranslate2; HF transformers + PyTorch are used when importable)

Models. For each preset (``small``: 3+3 layers, D 256, N 4, F 1024, V 8000; ``base``: 6+6, D 512, N 8,
F 2048, V 32000) one set of random jaxformer parameters (key 0, output layer scaled by 4 so that the
random model's distributions are peaked) is decoded by jaxformer and, through
``jaxformer.interop.to_ctranslate2``, by CTranslate2 with float32 and with int8 weights: the same
weights. HuggingFace ``MarianMTModel.generate`` runs a Marian model of the same shape (relu, sinusoidal
positions, scaled embeddings) with its own random weights: same size and work per token, not the same
numbers.

Workloads (the issue's): batch 1 greedy, batch 16 beam 4, batch 64 greedy; random source sentences of
32 tokens; exactly 64 new tokens per hypothesis for every engine (EOS is forbidden before the 64th token:
jaxformer ``min_length``, CTranslate2 ``min_decoding_length``, HF ``min_new_tokens``), so every engine
does the same number of decoder steps. Every call includes the encoder. Throughput is target tokens per
second counting every batch entry (batch x 64 / seconds; beams are not counted); latency is the time
of one call.

Timing. Every engine is warmed up once per workload (jaxformer's first call compiles: reported
separately as ``first_call_s``, compile plus one run). Then ``--rounds`` rounds (default 7); in each round
every workload runs once on every engine, the engine order rotating from round to round, so that a
change in the machine's load hits every engine alike. Reported: the median and the spread (min, max) of
the rounds. CTranslate2 runs with ``intra_threads`` = ``--threads`` (default: the CPU count) and one
translator; PyTorch with ``torch.set_num_threads(--threads)``; XLA with its default thread pool.
The machine's load average is recorded before and after: the CPU may be shared.

Checks. The token ids of jaxformer and CTranslate2 float32 are compared (same weights, same search):
the fraction of identical rows is reported (not asserted: two float32 implementations can break a
near-tie differently on random weights). Each engine's output length is checked to be exactly 64.

Scaling (``--scaling``, small preset): the time of one call for N = 64 ... 1024 new tokens (batch 1,
greedy), and for batch 1 ... 64 (greedy, N 64) and beam 1 ... 8 (batch 16, N 64), jaxformer and
CTranslate2 float32, median of ``--scaling-rounds``.

Writes ``experiments/results/bench_decode.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import numpy as np

import jaxformer
from jaxformer import Transformer, generate, init_params
from jaxformer.decoding import BeamSearch, GreedySearch
from jaxformer.interop import ids_vocab, to_ctranslate2

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py
from common import load_average, machine_info, markdown_table, output_dir, timed, write_json

BOS, EOS = 1, 2
FIRST_WORD = 4  # source ids are drawn from [4, V): no specials
SETTLE_S = 0.3  # pause before every timed call


class Workload(NamedTuple):
    name: str
    batch: int
    beam: int


WORKLOADS = (
    Workload("b1_greedy", 1, 1),
    Workload("b16_beam4", 16, 4),
    Workload("b64_greedy", 64, 1),
)
SMOKE_WORKLOADS = (
    Workload("b1_greedy", 1, 1),
    Workload("b2_beam2", 2, 2),
    Workload("b4_greedy", 4, 1),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "base"])
    parser.add_argument("--engines", nargs="+", default=None, help="default: every one available")
    parser.add_argument("--workloads", nargs="+", default=None, help="names; default: all")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--scaling-rounds", type=int, default=3)
    parser.add_argument("--out-dir", type=pathlib.Path, default=None)
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--smoke", action="store_true", help="tiny preset and sizes, one round")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one engine
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.rounds, args.source_length, args.new_tokens = ["tiny"], 1, 8, 8
        args.engines = args.engines or ["jaxformer", "ct2_float32", "ct2_int8"]
    args.out_dir = output_dir(args.out_dir, args.smoke, "bench_decode")
    return args


def available_engines() -> list[str]:
    engines = ["jaxformer"]
    try:
        import ctranslate2  # noqa: F401

        engines += ["ct2_float32", "ct2_int8"]
    except ImportError:
        print("CTranslate2 is not installed: its engines are skipped", file=sys.stderr)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        engines.append("hf_torch")
    except ImportError as error:
        print(f"HF transformers / PyTorch not importable ({error}): skipped", file=sys.stderr)
    return engines


def random_model(preset_name: str, seed: int = 0):
    config = jaxformer.preset(preset_name, dropout=0.0, attention_dropout=0.0, ffn_dropout=0.0)
    model = Transformer(config)
    params = jax.jit(init_params, static_argnums=0)(model, jax.random.key(seed))
    params = {**params, "output": jax.tree.map(lambda x: 4.0 * x, params["output"])}
    return config, model, params


def sources(batch: int, length: int, vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(FIRST_WORD, vocab, (batch, length), dtype=np.int32)


# --- engines: each returns run() -> int ids [batch, new_tokens] of the best hypothesis ---------------


def jaxformer_runner(model, params, src: np.ndarray, beam: int, new_tokens: int):
    strategy = GreedySearch() if beam == 1 else BeamSearch(beam)

    def run():
        result = generate(
            model, params, src, start_id=BOS, end_id=EOS, max_length=new_tokens,
            min_length=new_tokens, strategy=strategy,
        )  # fmt: skip
        return np.asarray(result.ids[:, 0])

    return run


def ct2_runner(translator, vocab: list[str], src: np.ndarray, beam: int, new_tokens: int):
    tokens = [[vocab[i] for i in row] for row in src]
    index = {t: i for i, t in enumerate(vocab)}

    def run():
        results = translator.translate_batch(
            tokens,
            beam_size=beam,
            length_penalty=0.0,
            max_decoding_length=new_tokens,
            min_decoding_length=new_tokens,
        )
        return np.asarray([[index[t] for t in r.hypotheses[0]] for r in results])

    return run


def hf_model(config):
    import torch
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    hf_config = MarianConfig(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        encoder_layers=config.num_encoder_layers,
        decoder_layers=config.num_decoder_layers,
        encoder_attention_heads=config.num_heads,
        decoder_attention_heads=config.num_heads,
        encoder_ffn_dim=config.ffn_dim,
        decoder_ffn_dim=config.ffn_dim,
        activation_function="relu",
        max_position_embeddings=config.max_len,
        scale_embedding=True,
        pad_token_id=0,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    return MarianMTModel(hf_config).eval()


def hf_runner(model, src: np.ndarray, beam: int, new_tokens: int):
    import torch

    input_ids = torch.from_numpy(src.astype(np.int64))
    mask = torch.ones_like(input_ids)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                num_beams=beam,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                length_penalty=0.0,
                early_stopping=False,
                bad_words_ids=None,
                forced_eos_token_id=None,
            )
        return out[:, 1:].numpy()  # drop the start token

    return run


# --- measurement -------------------------------------------------------------------------------------


def settled_timed(run) -> tuple[np.ndarray, float]:
    """``run()`` and its seconds, after a pause.

    OpenMP thread pools (CTranslate2's, PyTorch's) keep spinning for a while after a call; let them
    fall asleep so that they do not steal cycles from the next engine's run.
    """
    time.sleep(SETTLE_S)
    return timed(run)


def summary(times: list[float], tokens: int) -> dict:
    median = statistics.median(times)
    return dict(
        times_s=times,
        median_s=median,
        min_s=min(times),
        max_s=max(times),
        tokens=tokens,
        tokens_per_s=tokens / median,
        tokens_per_s_range=[tokens / max(times), tokens / min(times)],
    )


def export_models(preset_name: str, compute_types: list[str], workdir: pathlib.Path) -> dict:
    """CTranslate2 directories of the preset's random model, one per weight type."""
    config, _, params = random_model(preset_name)
    vocab = ids_vocab(config.vocab_size)
    paths = {}
    for compute_type in compute_types:
        paths[compute_type] = to_ctranslate2(
            config,
            params,
            workdir / preset_name / compute_type,
            source_vocab=vocab,
            target_vocab=vocab,
            quantization=None if compute_type == "float32" else compute_type,
        )
    return paths


def make_runner_factory(engine: str, preset_name: str, threads: int, model_dir: str | None):
    """Inside a worker: factory(src, beam, new_tokens) -> run."""
    if engine == "jaxformer":
        _, model, params = random_model(preset_name)
        return lambda src, beam, n: jaxformer_runner(model, params, src, beam, n)
    if engine.startswith("ct2_"):
        import ctranslate2

        translator = ctranslate2.Translator(
            model_dir, device="cpu", compute_type=engine.removeprefix("ct2_"),
            intra_threads=threads, inter_threads=1,
        )  # fmt: skip
        vocab = ids_vocab(translator_vocab_size(model_dir))
        return lambda src, beam, n: ct2_runner(translator, vocab, src, beam, n)
    if engine == "hf_torch":
        import torch

        torch.set_num_threads(threads)
        config = jaxformer.preset(preset_name)
        hf = hf_model(config)
        return lambda src, beam, n: hf_runner(hf, src, beam, n)
    raise ValueError(f"unknown engine {engine!r}")


def translator_vocab_size(model_dir: str) -> int:
    directory = pathlib.Path(model_dir)
    for name in ("shared_vocabulary.json", "target_vocabulary.json"):
        if (directory / name).exists():
            return len(json.loads((directory / name).read_text()))
    raise FileNotFoundError(f"no target vocabulary in {model_dir}")


REPLY = "@@reply "  # marks the worker's answers on its stdout (libraries may print too)


def worker_main(engine: str, preset_name: str, threads: int, model_dir: str | None):
    """``--worker``: serve timed calls of one engine, one JSON request per line on stdin.

    Each engine runs in its own process: CTranslate2 and PyTorch bring different OpenMP runtimes whose
    thread pools, loaded into one process, slow each other down by an order of magnitude.
    """
    factory = make_runner_factory(engine, preset_name, threads, model_dir)
    runs = {}
    for line in sys.stdin:
        request = json.loads(line)
        src = np.asarray(request["src"], np.int32)
        key = (src.shape, request["beam"], request["new_tokens"], request["seed"])
        if key not in runs:
            runs[key] = factory(src, request["beam"], request["new_tokens"])
        ids, seconds = settled_timed(runs[key])
        print(REPLY + json.dumps(dict(seconds=seconds, ids=ids.tolist())), flush=True)


class Worker:
    """The main process's handle on one engine's worker process."""

    def __init__(self, engine: str, preset_name: str, threads: int, model_dir=None):
        command = [sys.executable, __file__, "--worker", engine, "--presets", preset_name]
        command += ["--threads", str(threads)] + (
            ["--model-dir", str(model_dir)] if model_dir else []
        )
        self.engine = engine
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def call(
        self, src: np.ndarray, beam: int, new_tokens: int, seed: int
    ) -> tuple[float, np.ndarray]:
        request = dict(src=src.tolist(), beam=beam, new_tokens=new_tokens, seed=seed)
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY) :])
                return reply["seconds"], np.asarray(reply["ids"], np.int64)
        raise RuntimeError(f"worker {self.engine} ended (exit code {self.process.wait()})")

    def close(self):
        self.process.stdin.close()  # the worker's loop ends at end of input
        self.process.wait(timeout=60)
        self.process.stdout.close()


def start_workers(engine_names, preset_name, threads, workdir) -> dict[str, Worker]:
    ct2_types = [n.removeprefix("ct2_") for n in engine_names if n.startswith("ct2_")]
    paths = export_models(preset_name, ct2_types, workdir) if ct2_types else {}
    return {
        name: Worker(name, preset_name, threads, paths.get(name.removeprefix("ct2_")))
        for name in engine_names
    }


def bench_preset(args, preset_name: str, engine_names: list[str], workloads, workdir) -> list[dict]:
    config = jaxformer.preset(preset_name)
    workers = start_workers(engine_names, preset_name, args.threads, workdir)
    n = args.new_tokens
    rows = {}
    try:
        srcs = {w.name: sources(w.batch, args.source_length, config.vocab_size) for w in workloads}
        for w in workloads:
            outputs = {}
            for name, worker in workers.items():
                first_s, out = worker.call(srcs[w.name], w.beam, n, seed=1)
                if out.shape != (w.batch, n):
                    raise RuntimeError(
                        f"{name} {w.name}: output shape {out.shape} != {(w.batch, n)}"
                    )
                outputs[name] = out
                rows[(w.name, name)] = dict(
                    preset=preset_name, workload=w.name, batch=w.batch, beam=w.beam, engine=name,
                    first_call_s=first_s, times=[],
                )  # fmt: skip
            if "jaxformer" in outputs and "ct2_float32" in outputs:
                same = (outputs["jaxformer"] == outputs["ct2_float32"]).all(axis=1)
                rows[(w.name, "jaxformer")]["rows_equal_to_ct2_float32"] = float(same.mean())
            print(f"  {preset_name} {w.name}: warmed up", flush=True)
        names = list(workers)
        for r in range(args.rounds):
            for w in workloads:
                k = r % len(names)
                for name in names[k:] + names[:k]:  # rotate the engine order each round
                    seconds, _ = workers[name].call(srcs[w.name], w.beam, n, seed=1)
                    rows[(w.name, name)]["times"].append(seconds)
            print(f"  {preset_name}: round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    results = []
    for row in rows.values():
        times = row.pop("times")
        row.update(summary(times, row["batch"] * n))
        row["ms_per_step"] = 1e3 * row["median_s"] / n
        results.append(row)
    for row in results:
        ref = rows.get((row["workload"], "ct2_float32"))
        if ref is not None:
            row["vs_ct2_float32"] = row["tokens_per_s"] / ref["tokens_per_s"]
        hf = rows.get((row["workload"], "hf_torch"))
        if hf is not None:
            row["vs_hf_torch"] = row["tokens_per_s"] / hf["tokens_per_s"]
    return results


def bench_scaling(args, engine_names, workdir) -> list[dict]:
    names = [e for e in ("jaxformer", "ct2_float32") if e in engine_names]
    config = jaxformer.preset("small")
    workers = start_workers(names, "small", args.threads, workdir / "scaling")
    cases = [("new_tokens", n, 1, 1) for n in (64, 128, 256, 512, 1024)]
    cases += [("batch", 64, b, 1) for b in (1, 4, 16, 64)]
    cases += [("beam", 64, 16, w) for w in (1, 2, 4, 8)]
    results = []
    try:
        for kind, n, batch, beam in cases:
            src = sources(batch, args.source_length, config.vocab_size)
            for name, worker in workers.items():
                first_s, _ = worker.call(src, beam, n, seed=1)
                times = [worker.call(src, beam, n, seed=1)[0] for _ in range(args.scaling_rounds)]
                row = dict(sweep=kind, engine=name, new_tokens=n, batch=batch, beam=beam)
                row.update(summary(times, batch * n), first_call_s=first_s)
                row["ms_per_step"] = 1e3 * row["median_s"] / n
                results.append(row)
                print(f"  scaling {kind} N={n} B={batch} W={beam} {name}: {row['median_s']:.3f} s")
    finally:
        for worker in workers.values():
            worker.close()
    return results


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def _speed_cells(row: dict) -> list[str]:
    low, high = row["tokens_per_s_range"]
    return [
        row["preset"], row["workload"], row["engine"], f"{row['tokens_per_s']:.0f}",
        f"{low:.0f}-{high:.0f}", f"{1e3 * row['median_s']:.1f}", f"{row['ms_per_step']:.2f}",
        _ratio(row, "vs_ct2_float32"), _ratio(row, "vs_hf_torch"), f"{row['first_call_s']:.2f}",
    ]  # fmt: skip


def _scaling_cells(row: dict) -> list[str]:
    return [
        row["sweep"], row["new_tokens"], row["batch"], row["beam"], row["engine"],
        f"{row['median_s']:.3f}", f"{row['ms_per_step']:.2f}", f"{row['tokens_per_s']:.0f}",
    ]  # fmt: skip


SPEED_HEADERS = (
    "preset", "workload", "engine", "tokens/s", "range", "ms/call", "ms/step", "vs CT2 f32",
    "vs HF", "first call s",
)  # fmt: skip
SCALING_HEADERS = (
    "sweep", "new tokens", "batch", "beam", "engine", "s/call", "ms/step", "tokens/s",
)  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        "# Decoding speed: jaxformer vs CTranslate2 vs HF PyTorch",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, "
        f"threads {result['machine']['threads']}; load average before {result['load_before']}, "
        f"after {result['load_after']}. Source {result['settings']['source_length']} tokens, "
        f"{result['settings']['new_tokens']} new tokens forced, {result['settings']['rounds']} "
        "interleaved rounds; tokens/s = batch x new tokens / median seconds (range: slowest, "
        "fastest round).",
        "",
        *markdown_table(SPEED_HEADERS, "lllrlrrrrr", map(_speed_cells, result["rows"])),
    ]
    agreement = [
        f"{r['preset']} {r['workload']}: {r['rows_equal_to_ct2_float32']:.0%}"
        for r in result["rows"]
        if "rows_equal_to_ct2_float32" in r
    ]
    if agreement:
        lines += [
            "",
            "Rows where jaxformer's ids equal CTranslate2 float32's: " + ", ".join(agreement),
        ]
    if result.get("scaling"):
        lines += [
            "",
            "## Scaling (small preset; median seconds per call)",
            "",
            *markdown_table(SCALING_HEADERS, "lrrrlrrr", map(_scaling_cells, result["scaling"])),
        ]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    start = time.perf_counter()
    engines = args.engines or available_engines()
    workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    if args.workloads:
        workloads = tuple(w for w in workloads if w.name in args.workloads)
    result = dict(
        settings=dict(
            presets=args.presets,
            engines=engines,
            workloads=[w._asdict() for w in workloads],
            rounds=args.rounds,
            source_length=args.source_length,
            new_tokens=args.new_tokens,
            smoke=args.smoke,
        ),
        machine=machine_info(args.threads, packages=("ctranslate2", "torch", "transformers")),
        load_before=load_average(),
        rows=[],
    )
    with tempfile.TemporaryDirectory(prefix="bench_decode_models_") as tmp:
        for preset_name in args.presets:
            result["rows"] += bench_preset(args, preset_name, engines, workloads, pathlib.Path(tmp))
        if args.scaling:
            result["scaling"] = bench_scaling(args, engines, pathlib.Path(tmp))
    result["load_after"] = load_average()
    result["total_s"] = time.perf_counter() - start
    text = markdown(result)
    print(text)
    stem = "bench_decode" + (f"_{args.tag}" if args.tag else "")
    write_json(args.out_dir / f"{stem}.json", result)
    (args.out_dir / f"{stem}.md").write_text(text)
    print(f"wrote {args.out_dir / stem}.md and .json in {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker_main(arguments.worker, arguments.presets[0], arguments.threads, arguments.model_dir)
    else:
        run(arguments)
