"""Decoding on one GPU: jaxformer (float32, bfloat16) vs CTranslate2 (float32, float16, int8) vs HF
PyTorch (float16), and the fraction of the HBM roofline one decode step reaches.

Command:  python experiments/bench_gpu.py --device cuda --out-dir DIR   (a machine with an NVIDIA
                    GPU; not run on one yet: estimated 4-6 minutes on an H200, compiles included;
                    experiments/README.md "Running bench_gpu.py on a lent GPU" has the command for the `run` device tool,
                    with CTranslate2 carried as a wheel)
          python experiments/bench_gpu.py --smoke   (CPU, tiny sizes, every code path, into a temp
                    dir; half a minute to a minute on this project's 2 shared cores)
Needs:    jaxformer's own dependencies (run from the repository root with PYTHONPATH=.). PyTorch +
          transformers and CTranslate2 are used when importable; a missing one is reported.

Engines (one process per jaxformer engine, one for CTranslate2's, one for PyTorch's: each framework's
GPU context and thread pools stay apart, and a crash takes only its own engines with it):
- ``jaxformer_float32``: float32 parameters and activations; matmuls at ``--f32-precision``
  (default "highest": true float32, as CTranslate2 float32 and PyTorch compute; "default" lets XLA
  use TF32 on the GPU).
- ``jaxformer_bfloat16``: the same parameters cast to bfloat16 and ``config.dtype="bfloat16"``
  (activations and KV cache in bfloat16; attention softmax, logits and search scores stay float32).
- ``ct2_float32``, ``ct2_float16``, ``ct2_int8``: CTranslate2 on ``device="cuda"`` with that
  ``compute_type`` (float16 loads the float32 model and converts at load; int8 loads an int8 model,
  CTranslate2's ``int8`` = int8 matrices with float32 activations). On CPU: float32 and int8 only,
  float16 is reported as skipped (CTranslate2 has no float16 CPU kernels).
- ``hf_torch_float16``: ``MarianMTModel.generate`` in float16 on the GPU (``hf_torch_float32`` on CPU).

Shapes. ``base``: bench_decode's preset (6+6 layers, D 512, N 8, F 2048, V 32000), random jaxformer
weights (key 0, output layer x4) exported to CTranslate2 by ``jaxformer.interop.to_ctranslate2``; HF
runs a Marian model of the same shape with its own random weights (same work per token, not the same
numbers, so HF's ids are not compared there). ``marian-base``: bench_decode's random Hugging Face
Marian directory of opus-mt-en-de's shape (V 58101, tied output), loaded by every engine from that
directory (``load_pretrained``, CTranslate2's ``TransformersConverter``, ``from_pretrained``): the
same weights everywhere (written once with numpy + safetensors, ``--writer``, under
``--pretrained-dir``). The smoke run uses ``tiny`` and ``marian-tiny``. Every model, source and
runner comes from ``experiments/bench_decode.py``.

Workloads: batch 1 greedy, batch 64 greedy, batch 16 beam 4; random sources of ``--source-length``
tokens (Marian: right-padded rows of half to all of it); exactly ``--new-tokens`` (64) new tokens per
hypothesis everywhere (min length = max length), so every engine runs the same number of steps.
Every call includes the encoder. tokens/s = batch x new tokens / median seconds of a call.

Timing. Each engine is warmed up once per workload (jaxformer compiles then: ``first_call_s``; the
engine groups warm up side by side, so first calls overlap and read high). Then ``--rounds`` rounds;
in each, every workload runs once on every engine, the engine order rotating from round to round.
A round is started only if the previous one's duration still fits before the shape's share of
``--budget-s`` (default 360; shape i of n may run rounds until ``budget * (i + 1) / n`` seconds
after the start); every shape gets at least one round. A worker that gives no answer within
``--call-timeout-s`` (240) is killed and its engines reported. Results are written after each
shape, so a run killed by a timeout keeps what it finished. ``--settle-s`` pauses before every timed call (OpenMP pools of the
CPU engines keep spinning after a call; 0.05 s on a GPU, 0.3 on CPU).

Roofline (base batch 64 greedy; every shape is reported). The time of one decode step, without the
encoder: the same batch is decoded with N and with N/2 new tokens (every engine, in the same rounds,
``--step-pairs`` alternations per round), and

    step time  = (median t(N) - median t(N/2)) / (N - N/2)
    step bytes = (bytes(N) - bytes(N/2)) / (N - N/2)

The encoder, the set-up and the copies to and from the host are in both calls and cancel; what is
left is the steps N/2+1 .. N. ``bytes(M)``, the bytes M steps must read from memory at least: each
step reads every decoder parameter a step uses (self- and cross-attention query/output projections,
feed-forward, norms) and the output layer (a tied output reads the whole embedding table), at the
engine's weight type, the embedding rows of its tokens, the cross-attention keys and values of the
source (all layers, the real source tokens of each batch entry) and the self-attention keys and
values of the t tokens written so far, at the engine's activation type; the cross-attention
key/value projections are not counted (applied once per source, before the steps). An engine that
reads more (every preallocated cache slot, a cache copied at each step) or caches less does more
work than this count says: the fraction measures how close the step comes to moving only the bytes
it needs. (An engine that allocates ``max_length`` slots and attends to all of them, as jaxformer
did when this was written, reads N slots a step in the N call and N/2 in the N/2 call: the
difference charges those extra reads to the steps, as time this count does not pay for.) The JSON also has the step time
from the fastest calls and the fraction with every decoder-side parameter counted whole
(``fraction_of_peak_all_params``: cross-attention key/value projections and the whole target
embedding too). Peak: ``--peak-gbps`` (default 4800 GB/s, the H200's HBM3e datasheet figure; on CPU a nominal
20 GB/s, said so in the output, not a measurement of the machine). Achieved GB/s = step bytes /
step time; fraction = achieved / peak. A difference that is not positive (noise) is reported, not
turned into a number.

Unavailable engines. An engine that cannot be imported, whose model cannot be made (CTranslate2's
Marian converter needs transformers), that fails to load (CTranslate2 wheels link CUDA 12's cuBLAS)
or whose worker dies or stops answering is reported as ``unavailable: <reason>`` for that shape; the
others carry on and the script exits 0 (1 only when no engine measured anything).

Checks: each engine's outputs are exactly batch x N tokens; with the same weights, the fraction of
rows whose ids equal jaxformer float32's is reported (not asserted: bfloat16, float16 and int8
change near-ties, and so can TF32).

Writes ``bench_gpu.json`` and ``.md`` to ``--out-dir`` (default ``experiments/results``; the smoke
run: a temp dir); ``--worker-log`` collects the engine processes' stderr.
"""

from __future__ import annotations

import os

# Several processes share the GPU: XLA must not take 75% of its memory up front. Set before jax loads.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import importlib.util
import json
import pathlib
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import numpy as np

import jaxformer
from jaxformer.interop import ids_vocab

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py, bench_decode.py
import bench_decode as bd
from common import load_average, machine_info, markdown_table, output_dir, timed, write_json

H200_PEAK_GBPS = 4800.0  # HBM3e, NVIDIA's H200 datasheet
CPU_NOMINAL_GBPS = 20.0  # a nominal DRAM figure for CPU runs: not measured
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
REPLY = "@@bench_gpu "  # marks a worker's answers on its stdout (libraries may print there too)


class Workload(NamedTuple):
    name: str
    batch: int
    beam: int
    half: bool = False  # N/2 new tokens: the roofline's second call


WORKLOADS = (
    Workload("b1_greedy", 1, 1),
    Workload("b16_beam4", 16, 4),
    Workload("b64_greedy", 64, 1),
    Workload("b64_greedy_half", 64, 1, half=True),
)
SMOKE_WORKLOADS = (
    Workload("b2_beam2", 2, 2),
    Workload("b4_greedy", 4, 1),
    Workload("b4_greedy_half", 4, 1, half=True),
)
SHAPES = ("base", "marian-base")
SMOKE_SHAPES = ("tiny", "marian-tiny")


class Engine(NamedTuple):
    name: str
    family: str  # "jaxformer" | "ct2" | "hf_torch"
    dtype: str  # jaxformer: parameters and activations; CTranslate2: compute_type; PyTorch: dtype
    weight_bytes: int  # bytes of a matrix element
    vector_bytes: int  # bytes of a bias or norm element
    cache_bytes: int  # bytes of a key / value element

    @property
    def group(self) -> str:
        """The worker process that runs it: one per jaxformer engine, one per other framework."""
        return self.name if self.family == "jaxformer" else self.family


def all_engines(device: str) -> list[Engine]:
    hf = "float16" if device == "cuda" else "float32"
    size = {"float32": 4, "float16": 2, "bfloat16": 2}
    return [
        Engine("jaxformer_float32", "jaxformer", "float32", 4, 4, 4),
        Engine("jaxformer_bfloat16", "jaxformer", "bfloat16", 2, 2, 2),
        Engine("ct2_float32", "ct2", "float32", 4, 4, 4),
        Engine("ct2_float16", "ct2", "float16", 2, 2, 2),
        Engine("ct2_int8", "ct2", "int8", 1, 4, 4),
        Engine(f"hf_torch_{hf}", "hf_torch", hf, size[hf], size[hf], size[hf]),
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, help=f"default: {' '.join(SHAPES)}")
    parser.add_argument("--engines", nargs="+", default=None, help="names; default: all")
    parser.add_argument("--workloads", nargs="+", default=None, help="names; default: all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-pairs", type=int, default=2, help="N and N/2 calls per round")
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--peak-gbps", type=float, default=None, help="default: 4800 on a GPU")
    parser.add_argument("--budget-s", type=float, default=360.0, help="no round starts after it")
    parser.add_argument("--settle-s", type=float, default=None, help="pause before a timed call")
    parser.add_argument("--f32-precision", default="highest", help="jaxformer float32 matmuls")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU engines")
    parser.add_argument("--call-timeout-s", type=float, default=240.0, help="a worker's answer")
    parser.add_argument("--out-dir", type=pathlib.Path, default=None)
    parser.add_argument("--worker-log", type=pathlib.Path, default=None)
    parser.add_argument(
        "--pretrained-dir",
        type=pathlib.Path,
        default=None,
        help="parent of the random Marian directories (default: ~/.cache/jaxformer/bench_decode; "
        "a smoke run: a temp dir)",
    )
    parser.add_argument(
        "--writer",
        choices=("auto", "transformers", "numpy"),
        default="numpy",
        help="how a missing random Marian directory is written (bench_decode's writers; numpy: "
        "the same files as save_pretrained, without torch)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, one round")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one group
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.rounds, args.step_pairs, args.threads = "cpu", 1, 3, 1
        args.source_length, args.new_tokens = 8, 128
        args.settle_s = 0.0 if args.settle_s is None else args.settle_s
    if args.device == "auto":
        args.device = "cuda" if jax.default_backend() in ("gpu", "cuda") else "cpu"
    if args.settle_s is None:
        args.settle_s = 0.05 if args.device == "cuda" else 0.3
    if args.new_tokens < 2 or args.new_tokens % 2:
        parser.error("--new-tokens must be even and at least 2 (the roofline decodes N and N/2)")
    if args.worker is None:
        args.shapes = args.shapes or list(SMOKE_SHAPES if args.smoke else SHAPES)
        args.out_dir = output_dir(args.out_dir, args.smoke, "bench_gpu")
    return args


# --- the worker process: one engine group, every shape --------------------------------------------


def cast(params, dtype: str):
    return jax.tree.map(lambda x: x.astype(dtype), params)


def load_engine(args, engine: str, shape: str, model_dir: str | None, hf_dir: str | None):
    """factory(src, beam, new_tokens) -> run() -> ids [batch, new_tokens], in this worker."""
    family, dtype = engine.split("_")[0], engine.rsplit("_", 1)[1]
    if family == "jaxformer":
        if args.device == "cuda" and jax.default_backend() not in ("gpu", "cuda"):
            raise RuntimeError(f"JAX sees no GPU (its backend is {jax.default_backend()!r})")
        if hf_dir:
            pre = jaxformer.load_pretrained(hf_dir, dtype=dtype)
            model, params = pre.model, pre.params
            ids = dict(start_id=pre.start_id, end_id=pre.end_id)
            ids["suppress_ids"] = pre.generation.suppress_ids
        else:
            config, model, params = bd.random_model(shape)
            model, ids = jaxformer.Transformer(config.replace(dtype=dtype)), {}
        params = jax.block_until_ready(cast(params, dtype))
        precision = args.f32_precision if dtype == "float32" else None

        def factory(src, beam, n):
            run = bd.jaxformer_runner(model, params, src, beam, n, **ids)
            if precision is None:
                return run

            def run_at_precision():
                with jax.default_matmul_precision(precision):
                    return run()

            return run_at_precision

        return factory
    if family == "ct2":
        import ctranslate2

        if args.device == "cuda" and ctranslate2.get_cuda_device_count() < 1:
            raise RuntimeError("CTranslate2 sees no CUDA device (get_cuda_device_count() == 0)")
        options = dict(device=args.device, compute_type=dtype, inter_threads=1)
        if args.device == "cpu":
            options["intra_threads"] = args.threads
        translator = ctranslate2.Translator(model_dir, **options)
        if hf_dir:  # the Marian loader drops <pad>: the remaining ids are the same
            vocab = bd.translator_vocab(model_dir)
            pad = json.loads((pathlib.Path(hf_dir) / "config.json").read_text())["pad_token_id"]
        else:
            vocab, pad = ids_vocab(bd.translator_vocab_size(model_dir)), None
        return lambda src, beam, n: bd.ct2_runner(translator, vocab, src, beam, n, pad=pad)
    if family == "hf":
        import torch

        torch.set_num_threads(args.threads)
        if hf_dir:
            from transformers import MarianMTModel

            hf = MarianMTModel.from_pretrained(hf_dir)
            pad = json.loads((pathlib.Path(hf_dir) / "config.json").read_text())["pad_token_id"]
        else:
            hf, pad = bd.hf_model(jaxformer.preset(shape)), None
        hf = hf.to(device=args.device, dtype=getattr(torch, dtype)).eval()
        return lambda src, beam, n: bd.hf_runner(hf, src, beam, n, pad=pad, device=args.device)
    raise ValueError(f"unknown engine {engine!r}")


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return " ".join(text.split())[:400]


def worker_main(args):
    """Answers one JSON request a line on stdin: load an engine for a shape, or time a call."""
    reply = lambda **fields: print(REPLY + json.dumps(fields), flush=True)
    factories, runs, current_shape = {}, {}, None
    reply(ready=True, pid=os.getpid())
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "load":
                if request["shape"] != current_shape:  # free the previous shape's models
                    factories.clear()
                    runs.clear()
                    current_shape = request["shape"]
                factories[request["engine"]] = load_engine(
                    args, request["engine"], request["shape"], request.get("model_dir"),
                    request.get("hf_dir"),
                )  # fmt: skip
                reply(ok=True)
            else:
                key = (request["engine"], request["workload"])
                if key not in runs:
                    src = np.asarray(request["src"], np.int32)
                    runs[key] = factories[request["engine"]](
                        src, request["beam"], request["new_tokens"]
                    )
                time.sleep(args.settle_s)
                ids, seconds = timed(runs[key])
                reply(seconds=seconds, ids=np.asarray(ids).tolist())
        except Exception as error:  # reported as the engine's reason; the worker carries on
            reply(error=describe(error))


# --- the main process's handles on the workers -----------------------------------------------------


class WorkerDied(RuntimeError):
    """The worker process ended or stopped answering: every engine it runs is gone."""


class EngineFailed(RuntimeError):
    """The engine raised; the worker still answers."""


class Worker:
    def __init__(self, group: str, args, log_path: pathlib.Path):
        command = [sys.executable, __file__, "--worker", group, "--device", args.device]
        command += ["--threads", str(args.threads), "--settle-s", str(args.settle_s)]
        command += ["--f32-precision", args.f32_precision]
        env = dict(os.environ)
        if args.device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        if (
            args.smoke
        ):  # half the compile time, slower code: the smoke run compiles a dozen searches
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
        self.group, self.log_path, self.timeout = group, log_path, args.call_timeout_s
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            bufsize=1, env=env,
        )  # fmt: skip
        self.replies: queue.Queue = queue.Queue()
        self.dead: str | None = None  # why it is gone
        self.ready = False  # its first answer (imports done) has come
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            if line.startswith(REPLY):
                self.replies.put(json.loads(line[len(REPLY) :]))
        self.replies.put(None)  # end of output: the process ended

    def tail(self, lines: int = 4) -> str:
        """The last lines of the worker's stderr, for a reason."""
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return " | ".join([s.strip() for s in text if s.strip()][-lines:])[-600:]

    def _die(self, reason: str) -> WorkerDied:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        tail = self.tail()
        self.dead = f"{reason}" + (f"; its stderr ends: {tail}" if tail else "")
        return WorkerDied(self.dead)

    def ask(self, timeout: float | None = None, **request) -> dict:
        if self.dead:
            raise WorkerDied(self.dead)
        if request:
            try:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # the reply queue says how it ended
        try:
            reply = self.replies.get(timeout=timeout or self.timeout)
        except queue.Empty:
            wait = timeout or self.timeout
            raise self._die(f"{self.group} worker gave no answer in {wait:.0f} s") from None
        if reply is None:
            code = self.process.wait()
            raise self._die(f"{self.group} worker exited with code {code}")
        if "error" in reply:
            raise EngineFailed(reply["error"])
        return reply

    def close(self):
        try:
            self.process.stdin.close()  # the worker's loop ends at end of input
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=10)  # it ends at the end of the worker's output
        self.process.stdout.close()
        self.log.close()


# --- one shape --------------------------------------------------------------------------------------


def step_counts(config, params) -> dict:
    """Elements one decode step must read: decoder matrices and vectors except the cross-attention
    key/value projections (applied once per source), the output layer (a tied one: the whole
    embedding table), ``embedding_row`` elements per token of an untied target embedding; position
    tables (one row a step) are left out. ``all_matrices`` / ``all_vectors``: every parameter
    outside the encoder and the source embedding, counted whole (the cruder "all decoder
    parameters" count). ``kv_width``: keys (or values) per token per layer."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = lambda path: [str(getattr(k, "key", k)) for k in path]
    tied = not any(names(p)[:2] == ["output", "kernel"] for p, _ in leaves)
    counts = dict(matrices=0, vectors=0, embedding_row=0, all_matrices=0, all_vectors=0)
    for path, leaf in leaves:
        keys, size = names(path), int(np.prod(leaf.shape))
        matrix = len(leaf.shape) >= 2 and not any(w in keys[-1] for w in ("bias", "scale"))
        kind = "matrices" if matrix else "vectors"  # biases of shape [3, N, H] are vectors
        if keys[0] == "encoder" or keys[0].startswith("source"):
            continue
        counts[f"all_{kind}"] += size
        if "position" in "/".join(keys):
            continue
        if keys[0] == "decoder" and "memory_attention" in keys and "kv" in keys:
            continue
        if "embedding" in keys[0] and not tied:
            counts["embedding_row"] += int(leaf.shape[-1])
            continue
        counts[kind] += size
    head = config.attention_head_dim or config.d_model // config.num_heads
    counts.update(layers=config.num_decoder_layers, kv_width=config.num_heads * head)
    return counts


def call_bytes(
    counts: dict, engine: Engine, rows: int, source_tokens: int, steps: int, whole: bool = False
) -> float:
    """Bytes ``steps`` decode steps must read (module docstring): ``rows`` hypotheses,
    ``source_tokens`` real source tokens in all (the memory is read once per batch entry).
    ``whole``: every decoder-side parameter instead of those a step uses."""
    c, e = counts, engine
    if whole:
        weights = c["all_matrices"] * e.weight_bytes + c["all_vectors"] * e.vector_bytes
    else:
        weights = c["matrices"] * e.weight_bytes + c["vectors"] * e.vector_bytes
        weights += rows * c["embedding_row"] * e.weight_bytes
    per_token = 2 * c["layers"] * c["kv_width"] * e.cache_bytes  # a key and a value in every layer
    cross = source_tokens * per_token
    self_slots = rows * steps * (steps + 1) / 2  # step t reads the t tokens written so far
    return steps * (weights + cross) + self_slots * per_token


def model_counts(shape: str, hf_dir: str | None) -> dict:
    if hf_dir:
        pre = jaxformer.load_pretrained(hf_dir)
        return step_counts(pre.model.config, pre.params)
    config = jaxformer.preset(shape)
    model = jaxformer.Transformer(config)
    shapes = jax.eval_shape(lambda key: jaxformer.init_params(model, key), jax.random.key(0))
    return step_counts(config, shapes)


def new_tokens(args, workload: Workload) -> int:
    return args.new_tokens // 2 if workload.half else args.new_tokens


def missing_reason(engine: Engine, device: str, marian: bool) -> str | None:
    """Why an engine cannot run here, known before any process starts (None: try it)."""

    def have(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    if engine.family == "ct2":
        if engine.dtype == "float16" and device == "cpu":
            return (
                "float16 skipped on CPU: CTranslate2 has no float16 CPU kernels (a GPU run has it)"
            )
        if not have("ctranslate2"):
            return "ctranslate2 is not installed (No module named 'ctranslate2')"
        if marian and not (have("transformers") and have("torch")):
            return "CTranslate2's TransformersConverter (the Marian model) needs transformers and torch"
    if engine.family == "hf_torch":
        for module in ("torch", "transformers"):
            if not have(module):
                return f"{module} is not installed (No module named '{module}')"
    return None


def shape_sources(args, shape: str, workloads, hf_dir: str | None) -> tuple[dict, int | None]:
    """The sources of each workload (a half shares its full workload's) and the padding id."""
    if hf_dir:
        vocab = json.loads((pathlib.Path(hf_dir) / "config.json").read_text())["vocab_size"]
        make, pad = lambda b: bd.marian_sources(b, args.source_length, vocab), vocab - 1
    else:
        vocab = jaxformer.preset(shape).vocab_size
        make, pad = lambda b: bd.sources(b, args.source_length, vocab), None
    made = {}
    for w in workloads:
        made.setdefault((w.batch, w.beam), make(w.batch))
    return {w.name: made[(w.batch, w.beam)] for w in workloads}, pad


def real_tokens(src: np.ndarray, pad: int | None) -> int:
    return int(src.size if pad is None else (src != pad).sum())


def full_of(workloads) -> dict[str, Workload]:
    """Each half workload's full one (same batch and beam, N new tokens)."""
    return {
        h.name: w
        for h in workloads
        if h.half
        for w in workloads
        if not w.half and (w.batch, w.beam) == (h.batch, h.beam)
    }


def bench_shape(args, shape, engines, workloads, workdir, workers, deadline) -> dict:
    """Warm-up, rounds and summary of one shape; ``workers`` (group -> Worker) is shared by shapes."""
    marian = shape in bd.MARIAN_SHAPES
    unavailable: dict[str, str] = {}
    hf_dir, info = None, None
    if marian:
        parent = args.pretrained_dir or (
            workdir if args.smoke else pathlib.Path.home() / ".cache/jaxformer/bench_decode"
        )
        info = bd.ensure_marian_dir(shape, (parent / shape).absolute(), args.writer)
        hf_dir = info["directory"]
    for engine in engines:
        reason = missing_reason(engine, args.device, marian)
        if reason:
            unavailable[engine.name] = reason
    model_dirs = {}
    ct2 = [e for e in engines if e.family == "ct2" and e.name not in unavailable]
    if ct2:  # float16 loads the float32 model (CTranslate2 converts at load)
        weights = lambda e: "int8" if e.dtype == "int8" else "float32"
        try:
            types = sorted({weights(e) for e in ct2})
            if marian:
                paths = bd.convert_marian(pathlib.Path(hf_dir), types)
            else:
                paths = bd.export_models(shape, types, workdir)
            model_dirs = {e.name: str(paths[weights(e)]) for e in ct2}
        except Exception as error:
            for e in ct2:
                unavailable[e.name] = f"the CTranslate2 model could not be made: {describe(error)}"
    srcs, pad = shape_sources(args, shape, workloads, hf_dir)
    by_group: dict[str, list[Engine]] = {}
    for engine in engines:
        if engine.name not in unavailable:
            by_group.setdefault(engine.group, []).append(engine)
    for group in by_group:
        if group not in workers or workers[group].dead:
            if group in workers:
                workers[group].close()
            log = workdir / f"worker_{group}_{len(workers)}.log"
            workers[group] = Worker(group, args, log)
    first: dict[tuple[str, str], tuple[float, np.ndarray]] = {}

    def lose(group_engines, reason):
        for e in group_engines:
            unavailable.setdefault(e.name, reason)

    def warm_up(group: str):
        worker, group_engines = workers[group], by_group[group]
        try:
            if not worker.ready:
                worker.ask(timeout=max(args.call_timeout_s, 120.0))
                worker.ready = True
            for engine in group_engines:
                try:
                    worker.ask(
                        op="load", engine=engine.name, shape=shape,
                        model_dir=model_dirs.get(engine.name), hf_dir=hf_dir,
                    )  # fmt: skip
                except EngineFailed as error:
                    unavailable[engine.name] = f"failed to load: {error}"
                    continue
                for w in workloads:
                    n = new_tokens(args, w)
                    try:
                        reply = worker.ask(
                            op="run", engine=engine.name, workload=w.name,
                            src=srcs[w.name].tolist(), beam=w.beam, new_tokens=n,
                        )  # fmt: skip
                    except EngineFailed as error:
                        unavailable[engine.name] = f"failed on {w.name}: {error}"
                        break
                    ids = np.asarray(reply["ids"])
                    if ids.shape != (w.batch, n):
                        unavailable[engine.name] = f"{w.name}: {ids.shape} ids, not {(w.batch, n)}"
                        break
                    first[(w.name, engine.name)] = (reply["seconds"], ids)
                if engine.name not in unavailable:
                    print(f"  {shape} {engine.name}: warmed up", flush=True)
        except WorkerDied as error:
            lose(group_engines, str(error))

    with ThreadPoolExecutor(max(1, len(by_group))) as pool:
        list(pool.map(warm_up, by_group))
    active = [e for e in engines if e.name not in unavailable]
    times = {(w.name, e.name): [] for w in workloads for e in active}
    halves = full_of(workloads)
    paired = {w.name for w in halves.values()} | set(halves)
    schedule = [w for w in workloads if w.name not in paired]
    for half, full in halves.items():
        schedule += [full, next(w for w in workloads if w.name == half)] * args.step_pairs
    rounds_done, stopped, last = 0, None, 0.0
    for r in range(args.rounds):
        began = time.perf_counter()
        if r > 0 and began + last > deadline:
            stopped = (
                f"--budget-s: rounds {r + 1}-{args.rounds} not started (the last round took "
                f"{last:.0f} s and the shape's share of the budget ends in "
                f"{max(0.0, deadline - began):.0f} s)"
            )
            break
        for w in schedule:
            live = [e for e in active if e.name not in unavailable]
            k = r % max(1, len(live))
            for engine in live[k:] + live[:k]:  # rotate the engine order each round
                if engine.name in unavailable:
                    continue
                try:
                    reply = workers[engine.group].ask(op="run", engine=engine.name, workload=w.name)
                    times[(w.name, engine.name)].append(reply["seconds"])
                except EngineFailed as error:
                    unavailable[engine.name] = f"failed in round {r + 1} ({w.name}): {error}"
                except WorkerDied as error:
                    lose(by_group[engine.group], f"in round {r + 1}: {error}")
        last = time.perf_counter() - began
        rounds_done += 1
        print(f"  {shape}: round {r + 1}/{args.rounds} done in {last:.1f} s", flush=True)
    rows = summarize(args, shape, marian, engines, workloads, times, first, unavailable)
    counts = model_counts(shape, hf_dir)
    roofline = roofline_rows(args, shape, engines, workloads, rows, counts, srcs, pad)
    return dict(
        rows=rows,
        roofline=roofline,
        unavailable=[
            dict(shape=shape, engine=e.name, reason=unavailable[e.name])
            for e in engines
            if e.name in unavailable
        ],
        shape=dict(
            rounds_done=rounds_done,
            stopped=stopped,
            pretrained=info,
            step_counts=counts,
            source_tokens={w.name: real_tokens(srcs[w.name], pad) for w in workloads},
        ),
    )


def summarize(args, shape, marian, engines, workloads, times, first, unavailable) -> list[dict]:
    rows = {}
    for w in workloads:
        n = new_tokens(args, w)
        for engine in engines:
            seconds = times.get((w.name, engine.name))
            if engine.name in unavailable or not seconds:
                continue
            row = dict(
                shape=shape, workload=w.name, batch=w.batch, beam=w.beam, new_tokens=n,
                engine=engine.name, dtype=engine.dtype, first_call_s=first[(w.name, engine.name)][0],
            )  # fmt: skip
            row.update(bd.summary(seconds, w.batch * n))
            row["ms_per_step"] = 1e3 * row["median_s"] / n
            reference = None
            if "jaxformer_float32" not in unavailable:
                reference = first.get((w.name, "jaxformer_float32"))
            same_weights = marian or engine.family != "hf_torch"  # base: HF has its own weights
            if reference is not None and same_weights and engine.name != "jaxformer_float32":
                same = (first[(w.name, engine.name)][1] == reference[1]).all(axis=1)
                row["rows_equal_to_jaxformer_float32"] = float(same.mean())
            rows[(w.name, engine.name)] = row
    for (workload, _), row in rows.items():
        reference = rows.get((workload, "jaxformer_float32"))
        if reference is not None:
            row["vs_jaxformer_float32"] = row["tokens_per_s"] / reference["tokens_per_s"]
    return list(rows.values())


def roofline_rows(args, shape, engines, workloads, rows, counts, srcs, pad) -> list[dict]:
    """Per engine: the step time and bytes from the N and N/2 calls (module docstring)."""
    medians = {(r["workload"], r["engine"]): r for r in rows}
    peak = args.peak_gbps
    out = []
    for half, full in full_of(workloads).items():
        n, m = args.new_tokens, args.new_tokens // 2
        source_tokens = real_tokens(srcs[full.name], pad)
        for engine in engines:
            a, b = medians.get((full.name, engine.name)), medians.get((half, engine.name))
            if a is None or b is None:
                continue
            hypotheses = full.batch * full.beam
            step_bytes, whole_bytes = (
                (
                    call_bytes(counts, engine, hypotheses, source_tokens, n, whole)
                    - call_bytes(counts, engine, hypotheses, source_tokens, m, whole)
                )
                / (n - m)
                for whole in (False, True)
            )
            step_s = (a["median_s"] - b["median_s"]) / (n - m)
            step_s_min = (a["min_s"] - b["min_s"]) / (n - m)
            entry = dict(
                shape=shape, workload=full.name, engine=engine.name, new_tokens=[n, m],
                median_s=[a["median_s"], b["median_s"]], step_ms=1e3 * step_s,
                step_ms_from_fastest=1e3 * step_s_min, step_mb=step_bytes / 1e6,
                step_mb_all_params=whole_bytes / 1e6, peak_gbps=peak, gbps=None,
                fraction_of_peak=None, fraction_of_peak_all_params=None,
            )  # fmt: skip
            if step_s > 0:
                entry["gbps"] = step_bytes / step_s / 1e9
                entry["fraction_of_peak"] = entry["gbps"] / peak
                entry["fraction_of_peak_all_params"] = whole_bytes / step_s / 1e9 / peak
            else:
                entry["note"] = (
                    f"t(N) - t(N/2) = {1e3 * (a['median_s'] - b['median_s']):.3f} ms is not "
                    "positive: the calls' noise is larger than N/2 steps"
                )
            out.append(entry)
    return out


# --- the whole run -----------------------------------------------------------------------------------

PAIRS = (  # (numerator, denominator) of the comparison table: tokens/s ratios
    ("jaxformer_float32", "ct2_float32"),
    ("jaxformer_bfloat16", "ct2_float16"),
    ("jaxformer_bfloat16", "ct2_int8"),
    ("jaxformer_float32", "hf_torch"),
    ("jaxformer_bfloat16", "hf_torch"),
)

SPEED_HEADERS = (
    "shape", "workload", "engine", "tokens/s", "range", "ms/call", "ms/step", "x jaxformer f32",
    "ids = jaxformer f32", "first call s",
)  # fmt: skip
ROOFLINE_HEADERS = (
    "shape", "workload", "engine", "step ms", "step ms (fastest)", "MB a step must read", "GB/s",
    "of peak", "of peak, all decoder params",
)  # fmt: skip


def _speed_cells(row: dict) -> list:
    low, high = row["tokens_per_s_range"]
    agree = row.get("rows_equal_to_jaxformer_float32")
    return [
        row["shape"], row["workload"], row["engine"], f"{row['tokens_per_s']:.0f}",
        f"{low:.0f}-{high:.0f}", f"{1e3 * row['median_s']:.1f}", f"{row['ms_per_step']:.3f}",
        f"{row['vs_jaxformer_float32']:.2f}x" if "vs_jaxformer_float32" in row else "-",
        "-" if agree is None else f"{agree:.0%}", f"{row['first_call_s']:.2f}",
    ]  # fmt: skip


def _roofline_cells(entry: dict) -> list:
    gbps, fraction = entry["gbps"], entry["fraction_of_peak"]
    return [
        entry["shape"], entry["workload"], entry["engine"], f"{entry['step_ms']:.3f}",
        f"{entry['step_ms_from_fastest']:.3f}", f"{entry['step_mb']:.1f}",
        "-" if gbps is None else f"{gbps:.1f}",
        entry.get("note", "-") if fraction is None else f"{fraction:.1%}",
        "-" if fraction is None else f"{entry['fraction_of_peak_all_params']:.1%}",
    ]  # fmt: skip


def comparison_lines(result: dict) -> list[str]:
    hf = next((e for e in result["settings"]["engines"] if e.startswith("hf_torch")), "hf_torch")
    pairs = [(a, hf if b == "hf_torch" else b) for a, b in PAIRS]
    speed = {(r["shape"], r["workload"], r["engine"]): r["tokens_per_s"] for r in result["rows"]}
    keys = dict.fromkeys((r["shape"], r["workload"]) for r in result["rows"])
    table = []
    for shape, workload in keys:
        cells = [shape, workload]
        for a, b in pairs:
            x, y = speed.get((shape, workload, a)), speed.get((shape, workload, b))
            cells.append("-" if x is None or y is None else f"{x / y:.2f}x")
        table.append(cells)
    headers = ["shape", "workload", *(f"{a} / {b}" for a, b in pairs)]
    return markdown_table(headers, "ll" + "r" * len(pairs), table)


def _load(load: list[float] | None) -> str:
    return "-" if load is None else " / ".join(f"{x:.1f}" for x in load)


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    device = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} CPUs"
    lines = [
        "# Decoding on one GPU: jaxformer vs CTranslate2 vs HF PyTorch",
        "",
        f"Device: {device} ({s['device']}); interleaved rounds: {s['rounds']} "
        f"(N / N/2 pairs {s['step_pairs']} a round), source {s['source_length']} tokens, "
        f"{s['new_tokens']} new tokens forced; tokens/s = batch x new tokens / median seconds of a "
        "call (encoder included; range: slowest, fastest round); ms/step = ms/call / new tokens. "
        f"jaxformer float32 matmuls at precision {s['f32_precision']!r}. Load average before "
        f"{_load(result['load_before'])}, after {_load(result.get('load_after'))}.",
    ]
    if not result.get("complete"):
        lines += ["", "**Incomplete: the run ended before every shape was measured.**"]
    if s["smoke"]:
        lines += ["", "Smoke run: tiny sizes on CPU, the numbers say nothing about the engines."]
    speed_rows = [_speed_cells(r) for r in result["rows"]]
    speed_rows += [
        [u["shape"], "-", u["engine"], f"unavailable: {u['reason']}", *[""] * 6]
        for u in result["unavailable"]
    ]
    lines += ["", "## Speed", "", *markdown_table(SPEED_HEADERS, "lllrlrrrrr", speed_rows)]
    lines += ["", "## jaxformer / the others (tokens/s; above 1: jaxformer faster)", ""]
    lines += comparison_lines(result)
    lines += [
        "",
        "## Roofline: one decode step",
        "",
        "Step time = (t(N) - t(N/2)) / (N/2) from the median calls (and from the fastest); MB a "
        "step must read = decoder parameters a step uses + output layer at the engine's weight "
        "type, cross-attention keys/values of the real source tokens and the self-attention "
        "keys/values written so far at its activation type (averaged over steps N/2+1..N); "
        f"fraction of {s['peak_gbps']:.0f} GB/s ({s['peak_source']}). Last column: every "
        "decoder-side parameter counted whole (cross-attention key/value projections and the "
        "target embedding table too).",
        "",
        *markdown_table(
            ROOFLINE_HEADERS, "lllrrrrrr", [_roofline_cells(e) for e in result["roofline"]]
        ),
    ]
    notes = [
        f"{shape}: {part['stopped']}"
        for shape, part in result["shapes"].items()
        if part.get("stopped")
    ]
    if notes:
        lines += ["", "Rounds cut by the budget: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def gpu_name() -> str | None:
    devices = [d for d in jax.devices() if d.platform in ("gpu", "cuda")]
    return getattr(devices[0], "device_kind", str(devices[0])) if devices else None


def write_results(args, result: dict) -> str:
    text = markdown(result)
    write_json(args.out_dir / "bench_gpu.json", result)
    (args.out_dir / "bench_gpu.md").write_text(text)
    return text


def run(args) -> dict:
    start = time.perf_counter()
    engines = [e for e in all_engines(args.device) if not args.engines or e.name in args.engines]
    workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    if args.workloads:
        workloads = tuple(w for w in workloads if w.name in args.workloads)
    if args.peak_gbps is None:
        cuda = args.device == "cuda"
        args.peak_gbps = H200_PEAK_GBPS if cuda else CPU_NOMINAL_GBPS
        peak_source = (
            "the H200's HBM3e datasheet figure, the default of --peak-gbps"
            if cuda
            else "a nominal CPU memory figure, not measured on this machine: --peak-gbps sets one"
        )
    else:
        peak_source = "--peak-gbps"
    machine = machine_info(args.threads, packages=("ctranslate2", "torch", "transformers"))
    machine["gpu"] = gpu_name() if args.device == "cuda" else None
    result = dict(
        settings=dict(
            shapes=args.shapes,
            engines=[e.name for e in engines],
            workloads=[dict(w._asdict(), new_tokens=new_tokens(args, w)) for w in workloads],
            rounds=args.rounds,
            step_pairs=args.step_pairs,
            source_length=args.source_length,
            new_tokens=args.new_tokens,
            device=args.device,
            peak_gbps=args.peak_gbps,
            peak_source=peak_source,
            budget_s=args.budget_s,
            settle_s=args.settle_s,
            f32_precision=args.f32_precision,
            smoke=args.smoke,
            xla_flags=os.environ.get("XLA_FLAGS"),
            worker_xla_flags_added=SMOKE_XLA_FLAGS if args.smoke else None,
        ),
        machine=machine,
        load_before=load_average(),
        rows=[],
        roofline=[],
        unavailable=[],
        shapes={},
        complete=False,
    )
    workers: dict[str, Worker] = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        workdir = pathlib.Path(tmp)
        try:
            for i, shape in enumerate(args.shapes):
                deadline = start + args.budget_s * (i + 1) / len(args.shapes)
                print(f"{shape}: {time.perf_counter() - start:.0f} s in", flush=True)
                try:
                    part = bench_shape(args, shape, engines, workloads, workdir, workers, deadline)
                except Exception as error:  # the shape is reported; the next one still runs
                    import traceback

                    traceback.print_exc()
                    part = dict(
                        rows=[], roofline=[], shape=dict(failed=describe(error)),
                        unavailable=[dict(shape=shape, engine="all", reason=describe(error))],
                    )  # fmt: skip
                for key in ("rows", "roofline", "unavailable"):
                    result[key] += part[key]
                result["shapes"][shape] = part["shape"]
                result["total_s"] = time.perf_counter() - start
                write_results(args, result)  # what is done survives a timeout
        finally:
            for worker in workers.values():
                worker.close()
            if args.worker_log:
                args.worker_log.parent.mkdir(parents=True, exist_ok=True)
                with open(args.worker_log, "w") as log:
                    for path in sorted(workdir.glob("worker_*.log")):
                        log.write(f"==> {path.name} <==\n{path.read_text(errors='replace')}\n")
    result["complete"] = True
    result["load_after"] = load_average()
    result["total_s"] = time.perf_counter() - start
    print(write_results(args, result))
    print(f"wrote {args.out_dir / 'bench_gpu'}.md and .json in {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker_main(arguments)
    else:
        sys.exit(0 if run(arguments)["rows"] else 1)
