"""A decoder-only model of real size: load time, peak memory and decoding speed, jaxformer vs transformers
(PyTorch) vs CTranslate2's ``Generator``, on the same weights.

Command:  python experiments/bench_lm.py                  (Llama-3.2-1B's shapes; about an hour on 2 cores)
          python experiments/bench_lm.py --memory-only    (the loading modes' peak memory, a few minutes)
          python experiments/bench_lm.py --smoke          (a tiny Llama, seconds, into a temp dir)
Needs:    a throwaway environment with the CPU build of PyTorch, transformers and ctranslate2 besides
          jaxformer (engines whose package is missing are left out, and said so):
            python3.11 -m venv /tmp/lmbench && /tmp/lmbench/bin/pip install torch==2.13.0
            /tmp/lmbench/bin/pip install transformers ctranslate2 -e .

The model. ``experiments/lm_checkpoint.py`` writes, once, a Hugging Face directory with the exact
shapes and settings of meta-llama/Llama-3.2-1B (16 layers, D 2048, 32 heads, 8 key/value heads,
F 8192, vocabulary 128,256, tied embeddings, llama3 RoPE scaling, three end ids) and random bfloat16
weights (2.47 GB); nothing is downloaded. Every engine loads that directory its own way:
jaxformer ``load_pretrained(dir, param_dtype=...)``, transformers
``AutoModelForCausalLM.from_pretrained(dir, dtype=...)``, CTranslate2 its ``TransformersConverter``
(``quantization`` float32, bfloat16, int8_float32), converted once next to it.

Engines: ``jaxformer_float32`` (parameters converted to float32 as they are read),
``jaxformer_bfloat16`` (parameters, activations and KV cache in bfloat16, as read from the file;
softmax, logits and scores in float32), ``hf_float32``, ``hf_bfloat16``, ``ct2_float32``,
``ct2_bfloat16``, ``ct2_int8`` (int8 weights, float32 activations). Each engine runs in its own
process (their thread pools slow each other down in one). Engines run in two groups (float32;
bfloat16 and int8) so that the host holds one group's models at a time (24 GiB here).

Workloads: batch 1 greedy, and batch 8 with beam 4 (length penalty 0); random prompts of
``--prompt-length`` tokens; exactly ``--new-tokens`` (256) new tokens per hypothesis for every engine
(the end tokens are impossible before: jaxformer ``min_length``, transformers ``min_new_tokens``,
CTranslate2 ``min_length``), so every engine does the same steps. Reported: milliseconds per step
(one new token for every row) and tokens per second (batch x new tokens / seconds; beams not
counted), the median of ``--rounds`` rounds; in each round every workload runs on every engine of
the group, the order rotating from round to round. jaxformer's first call compiles: its time is
reported apart (``first_call_s``). Load: the seconds of the loading call and the peak resident
memory it added (``ru_maxrss`` after loading minus the resident memory before, with the engine's
library already imported and initialised).

Ids: every engine's ids are compared with ``jaxformer_float32``'s (rows equal, reported, not
asserted: random weights give near-ties that another order of summation breaks differently).

``--memory-only``: the loading modes alone, each in a fresh process: jaxformer float32, bfloat16,
bfloat16 onto a mesh of 8 (simulated) devices, and ``safetensors.numpy.load_file`` of the whole file
for comparison; peak added memory in GB and as a multiple of the checkpoint's size.

Writes ``experiments/results/bench_lm.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine_info, markdown_table, output_dir, write_json
from lm_checkpoint import write as write_checkpoint

REPLY = "@@reply "
GROUPS = {
    "float32": ["jaxformer_float32", "hf_float32", "ct2_float32"],
    "low": ["jaxformer_bfloat16", "hf_bfloat16", "ct2_bfloat16", "ct2_int8"],
}
WORKLOADS = {"greedy_b1": (1, 1), "beam4_b8": (8, 4)}  # name -> (batch, beam)
CT2_TYPES = {"ct2_float32": "float32", "ct2_bfloat16": "bfloat16", "ct2_int8": "int8_float32"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--model-dir", default="~/.cache/jaxformer/bench_lm/llama-3.2-1b")
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--engines", nargs="*", default=None, help="default: every available")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure-load", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.new_tokens, args.prompt_length, args.rounds = "tiny-llama", 8, 6, 1
        if args.model_dir == parser.get_default("model_dir"):
            args.model_dir = "~/.cache/jaxformer/bench_lm/tiny-llama"
    args.model_dir = pathlib.Path(args.model_dir).expanduser()
    return args


def available(name: str) -> bool:
    """Whether the engine's packages are installed (CTranslate2's converter needs transformers)."""
    import importlib.util

    needs = {"jaxformer": ["jax"], "hf": ["transformers", "torch"]}
    needs["ct2"] = ["ctranslate2", "transformers", "torch"]
    return all(importlib.util.find_spec(m) for m in needs[name.split("_")[0]])


def rss_gb() -> float:
    """This process's resident memory now (GB), from /proc."""
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kB


# --- engines (each in its worker process) ------------------------------------------------------------


def load_engine(engine: str, model_dir: pathlib.Path, threads: int):
    """``(run(prompts int[B, P], beam, new_tokens) -> ids int[B, new_tokens], load record)``."""
    family, precision = engine.split("_", 1)
    if family == "jaxformer":
        import jax

        import jaxformer
        from jaxformer import decoding as dec

        jax.numpy.zeros(()).block_until_ready()  # the backend up before the baseline
        before, start = rss_gb(), time.perf_counter()
        pre = jaxformer.load_pretrained(model_dir, param_dtype=precision, dtype=precision)
        jax.block_until_ready(pre.params)

        def run(prompts, beam, new):
            strategy = dec.BeamSearch(beam, length_penalty=0.0) if beam > 1 else dec.GreedySearch()
            result = jaxformer.generate(
                pre.model, pre.params, prompts, end_id=pre.end_id, max_length=new,
                min_length=new, strategy=strategy,
            )  # fmt: skip
            return np.asarray(result.ids[:, 0])

    elif family == "hf":
        import torch
        import transformers

        torch.set_num_threads(threads)
        before, start = rss_gb(), time.perf_counter()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

        def run(prompts, beam, new):
            with torch.inference_mode():
                out = model.generate(
                    torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=int),
                    max_new_tokens=new, min_new_tokens=new, num_beams=beam, do_sample=False,
                    length_penalty=0.0, early_stopping=False, pad_token_id=0,
                )  # fmt: skip
            return out[:, prompts.shape[1] :].numpy()

    else:
        import ctranslate2

        converted = model_dir.parent / f"{model_dir.name}-ct2-{CT2_TYPES[engine]}"
        if not (converted / "model.bin").exists():
            ctranslate2.converters.TransformersConverter(str(model_dir)).convert(
                str(converted), quantization=CT2_TYPES[engine]
            )
            _name_special_tokens(converted, model_dir)
        before, start = rss_gb(), time.perf_counter()
        generator = ctranslate2.Generator(str(converted), intra_threads=threads)

        def run(prompts, beam, new):
            tokens = [[f"t{i}" for i in row] for row in prompts.tolist()]
            results = generator.generate_batch(
                tokens, max_length=new, min_length=new, beam_size=beam, length_penalty=0.0,
                include_prompt_in_result=False, end_token=["t128001", "t128008", "t128009"],
            )  # fmt: skip
            return np.asarray([r.sequences_ids[0] for r in results])

    record = dict(load_s=time.perf_counter() - start, load_peak_gb=peak_gb() - before)
    return run, record


def _name_special_tokens(converted: pathlib.Path, model_dir: pathlib.Path) -> None:
    """The converter reads BOS and EOS from tokenizer_config.json, where the random checkpoint names
    none (CTranslate2 then refuses its own config, nulls in it): name them by the ids of config.json
    (the vocabulary's tokens are ``t{id}``)."""
    path, model = converted / "config.json", json.loads((model_dir / "config.json").read_text())
    config = json.loads(path.read_text())
    eos = model["eos_token_id"]
    config["bos_token"] = config["bos_token"] or f"t{model['bos_token_id']}"
    config["eos_token"] = config["eos_token"] or f"t{eos[0] if isinstance(eos, list) else eos}"
    path.write_text(json.dumps(config, indent=2))


def worker_main(engine: str, model_dir: pathlib.Path, threads: int):
    run, record = load_engine(engine, model_dir, threads)
    print(REPLY + json.dumps(record), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompts = np.asarray(request["prompts"], np.int64)
        time.sleep(0.3)  # thread pools of the previous engine fall asleep
        start = time.perf_counter()
        ids = run(prompts, request["beam"], request["new_tokens"])
        seconds = time.perf_counter() - start
        print(REPLY + json.dumps(dict(seconds=seconds, ids=ids.tolist())), flush=True)


class Worker:
    def __init__(self, engine: str, args):
        command = [sys.executable, __file__, "--worker", engine, "--model-dir", str(args.model_dir)]
        command += ["--threads", str(args.threads)]
        self.engine = engine
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.load = self._reply()

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise RuntimeError(f"worker {self.engine} ended (exit code {self.process.wait()})")

    def call(self, prompts: np.ndarray, beam: int, new_tokens: int) -> dict:
        request = dict(prompts=prompts.tolist(), beam=beam, new_tokens=new_tokens)
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=120)
        self.process.stdout.close()


# --- memory of the loading modes ---------------------------------------------------------------------


def measure_load(mode: str, model_dir: pathlib.Path) -> dict:
    """In this (fresh) process: the peak memory one loading mode adds."""
    import jax

    import jaxformer

    jax.numpy.zeros(()).block_until_ready()
    before, start = rss_gb(), time.perf_counter()
    if mode == "safetensors_load_file":
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(model_dir / "model.safetensors"))
            held = on_devices = sum(a.nbytes for a in arrays.values())
        except (TypeError, ValueError) as error:  # bfloat16 is not a numpy dtype
            return dict(mode=mode, error=str(error).splitlines()[0])
    else:
        mesh = jaxformer.sharding.make_mesh(1, 8) if mode.endswith("mesh8") else None
        dtype = "float32" if mode.startswith("float32") else "bfloat16"
        pre = jaxformer.load_pretrained(model_dir, param_dtype=dtype, mesh=mesh)
        jax.block_until_ready(pre.params)
        leaves = jax.tree.leaves(pre.params)
        held = sum(x.nbytes for x in leaves)
        on_devices = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    return dict(
        mode=mode, seconds=time.perf_counter() - start, peak_added_gb=peak_gb() - before,
        params_gb=held / 1e9, on_devices_gb=on_devices / 1e9,
    )  # fmt: skip


def memory_table(args) -> list[dict]:
    size = (args.model_dir / "model.safetensors").stat().st_size / 1e9
    rows = []
    modes = ("float32", "bfloat16", "bfloat16_mesh8", "safetensors_load_file")
    for mode in modes[1:3] if args.smoke else modes:  # the smoke run: two processes, not four
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if mode.endswith("mesh8"):
            env["XLA_FLAGS"] = (
                f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
            )
        command = [
            sys.executable,
            __file__,
            "--measure-load",
            mode,
            "--model-dir",
            str(args.model_dir),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        if "peak_added_gb" in row:
            row["peak_over_checkpoint"] = row["peak_added_gb"] / size
        rows.append(row | {"checkpoint_gb": size})
        print(row, flush=True)
    return rows


# --- the benchmark -----------------------------------------------------------------------------------


def bench(args) -> dict:
    engines = args.engines or [e for group in GROUPS.values() for e in group]
    missing = [e for e in engines if not available(e)]
    engines = [e for e in engines if e not in missing]
    rng = np.random.default_rng(1)
    vocab = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]
    prompts = {
        name: rng.integers(3, min(vocab, 128000), (batch, args.prompt_length))
        for name, (batch, _) in WORKLOADS.items()
    }
    times: dict = {}
    loads, ids = {}, {}
    for group in GROUPS.values():
        members = [e for e in engines if e in group]
        if not members:
            continue
        workers = {e: Worker(e, args) for e in members}
        loads |= {e: w.load for e, w in workers.items()}
        for name in args.workloads:
            _, beam = WORKLOADS[name]
            for engine, worker in workers.items():  # warm-up: jaxformer compiles here
                reply = worker.call(prompts[name], beam, args.new_tokens)
                times.setdefault((engine, name), {"first_call_s": reply["seconds"], "runs": []})
                ids[(engine, name)] = np.asarray(reply["ids"])
        for r in range(args.rounds):
            order = members[r % len(members) :] + members[: r % len(members)]
            for name in args.workloads:
                _, beam = WORKLOADS[name]
                for engine in order:
                    reply = workers[engine].call(prompts[name], beam, args.new_tokens)
                    times[(engine, name)]["runs"].append(reply["seconds"])
        for worker in workers.values():
            worker.close()
    rows = []
    for (engine, name), record in times.items():
        batch, beam = WORKLOADS[name]
        median = statistics.median(record["runs"])
        reference = ids.get(("jaxformer_float32", name))
        same = (
            None
            if reference is None
            else float(np.mean((ids[(engine, name)] == reference).all(-1)))
        )
        rows.append(
            dict(
                engine=engine, workload=name, batch=batch, beam=beam, median_s=median,
                runs_s=record["runs"], first_call_s=record["first_call_s"],
                ms_per_step=1000 * median / args.new_tokens,
                tokens_per_s=batch * args.new_tokens / median, rows_equal_jaxformer_f32=same,
            )
        )  # fmt: skip
    return dict(rows=rows, loads=loads, missing=missing)


def markdown(result: dict) -> str:
    lines = [f"# bench_lm ({result['shape']})", "", f"Machine: {result['machine']['cpu']}, "
             f"{result['machine']['cpu_count']} cores; {result['settings']}", ""]  # fmt: skip
    if result.get("memory"):
        lines += ["## Loading: peak memory added", ""]
        lines += markdown_table(
            ["mode", "seconds", "peak added GB", "x checkpoint", "params GB", "on devices GB"],
            "lrrrrr",
            [
                [
                    m["mode"],
                    f"{m.get('seconds', 0):.1f}",
                    f"{m.get('peak_added_gb', 0):.2f}",
                    f"{m.get('peak_over_checkpoint', 0):.2f}",
                    f"{m.get('params_gb', 0):.2f}",
                    f"{m.get('on_devices_gb', 0):.2f}",
                ]
                if "error" not in m
                else [m["mode"], m["error"], "", "", "", ""]
                for m in result["memory"]
            ],
        )
        lines.append("")
    if result.get("speed"):
        speed = result["speed"]
        lines += ["## Decoding", ""]
        lines += markdown_table(
            [
                "engine",
                "load s",
                "load peak GB",
                "workload",
                "ms / step",
                "tokens / s",
                "first call s",
                "rows = jaxformer f32",
            ],
            "lrrlrrrr",
            [
                [
                    r["engine"],
                    f"{speed['loads'][r['engine']]['load_s']:.1f}",
                    f"{speed['loads'][r['engine']]['load_peak_gb']:.2f}",
                    r["workload"],
                    f"{r['ms_per_step']:.1f}",
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['first_call_s']:.1f}",
                    ""
                    if r["rows_equal_jaxformer_f32"] is None
                    else f"{r['rows_equal_jaxformer_f32']:.2f}",
                ]
                for r in sorted(speed["rows"], key=lambda r: (r["workload"], r["engine"]))
            ],
        )
        if speed["missing"]:
            lines += ["", f"Not run (package missing): {', '.join(speed['missing'])}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.model_dir, args.threads)
        return {}
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.model_dir)), flush=True)
        return {}
    write_checkpoint(args.model_dir, args.shape)
    result = dict(
        shape=args.shape,
        machine=machine_info(args.threads, ("torch", "transformers", "ctranslate2")),
        settings=dict(
            rounds=args.rounds,
            new_tokens=args.new_tokens,
            prompt_length=args.prompt_length,
            threads=args.threads,
        ),
        memory=memory_table(args),
    )
    if not args.memory_only:
        result["speed"] = bench(args)
    out = output_dir(args.out, args.smoke, "bench_lm")
    stem = "bench_lm" + (f"_{args.tag}" if args.tag else "")
    write_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
