"""Decoding speed side by side: jaxformer vs CTranslate2 (float32, int8) vs HuggingFace PyTorch.

Command:  python experiments/bench_decode.py            (7 rounds: about 10 minutes on 2 CPU cores)
          python experiments/bench_decode.py --scaling  (adds the N / batch / beam scaling tables, about 2 minutes)
          python experiments/bench_decode.py --smoke    (tiny sizes, a few seconds, into a temp dir)
          python experiments/bench_decode.py --pretrained marian-base --rounds 3
                    (a random Marian-base Hugging Face directory through load_pretrained; below)
Needs:    pip install '.[bench]'  (CTranslate2; HF transformers + PyTorch are used when importable)
          A throwaway environment with the CPU build of PyTorch (PyPI's brings CUDA libraries):
            python3.11 -m venv /tmp/benchvenv
            /tmp/benchvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
            /tmp/benchvenv/bin/pip install -e '.[bench]'
            /tmp/benchvenv/bin/python experiments/bench_decode.py --pretrained marian-base

Models. For each preset (``small``: 3+3 layers, D 256, N 4, F 1024, V 8000; ``base``: 6+6, D 512, N 8,
F 2048, V 32000) one set of random jaxformer parameters (key 0, output layer scaled by 4 so that the
random model's distributions are peaked) is decoded by jaxformer (``jaxformer``: float32;
``jaxformer_bf16``: the same parameters cast to bfloat16 and ``config.dtype="bfloat16"``: products,
activations and KV cache in bfloat16, softmax, logits and scores in float32; ``jaxformer_int8``:
``config.quantization="int8"``, every projection int8 x int8 with per-channel weight and per-row
activation scales, as CTranslate2's int8; calls of 16 rows or more read int8 kernels stored once by
``quantize_params``, smaller ones the float32 parameters, whose products stay float32) and, through
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
separately as ``first_call_s``, compile plus one run, and as ``compile_s``, the first call minus the
median call). Then ``--rounds`` rounds (default 7); in each round
every workload runs once on every engine, the engine order rotating from round to round, so that a
change in the machine's load hits every engine alike. Reported: the median and the spread (min, max) of
the rounds. CTranslate2 runs with ``intra_threads`` = ``--threads`` (default: the CPU count) and one
translator; PyTorch with ``torch.set_num_threads(--threads)``; XLA with its default thread pool
(``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` with ``--threads 1``: every engine on one thread;
XLA_FLAGS is recorded).
The machine's load average is recorded before and after: the CPU may be shared.

Checks. The token ids of jaxformer and CTranslate2 float32 are compared (same weights, same search):
the fraction of identical rows is reported (not asserted: two float32 implementations can break a
near-tie differently on random weights). Each engine's output length is checked to be exactly 64.

Scaling (``--scaling``, small preset): the time of one call for N = 64 ... 1024 new tokens (batch 1,
greedy), and for batch 1 ... 64 (greedy, N 64) and beam 1 ... 8 (batch 16, N 64), jaxformer and
CTranslate2 float32, median of ``--scaling-rounds``.

Pretrained (``--pretrained marian-base``): instead of the presets, a random Hugging Face Marian
directory of the OPUS-MT base shape (6+6 layers, D 512, N 8, F 2048, V 58101, post-norm, swish, fixed
sinusoids, scaled and tied embeddings, ``final_logits_bias``; ``config.json`` and
``generation_config.json`` with Helsinki-NLP/opus-mt-en-de's fields) is written once with
``MarianMTModel(MarianConfig(...)).save_pretrained`` (``--writer numpy``: the same files with numpy +
safetensors, no torch) under ``--pretrained-dir`` (default ``~/.cache/jaxformer/bench_decode/SHAPE``)
and loaded by each engine its own way: jaxformer ``load_pretrained``, CTranslate2 its
``TransformersConverter`` (float32 and int8, cached next to it; the directory has no tokenizer, so the
converter is handed a made-up vocabulary with OPUS-MT's special ids), HF
``MarianMTModel.from_pretrained``: the same weights for all, so jaxformer's ids are compared with
CTranslate2 float32's and HF's. Workloads: CTranslate2's README protocol, greedy batch 1 and beam 4
batch 32. Sources: random words + ``</s>`` (row 0: ``--source-length`` tokens, the others between
half and all of it), right-padded with ``<pad>`` (HF masks it, CTranslate2 gets unpadded rows).
Random weights do not end sentences: ``--new-tokens`` tokens are forced as above (min length = max
length everywhere; HF's ``forced_eos_token_id`` is switched off), ``<pad>`` is never generated
(jaxformer ``suppress_ids`` = the directory's ``bad_words_ids``; HF the same; CTranslate2's Marian
vocabulary has no ``<pad>``). The load average after every round is recorded too.

Writes ``experiments/results/bench_decode.md`` and ``.json`` (``--tag`` adds a suffix; with
``--pretrained``, ``bench_decode_marian_base.md`` and ``.json``).
"""

from __future__ import annotations

import argparse
import itertools
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
from jaxformer.models.quantization import MIN_ROWS, quantize_params

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
PRETRAINED_WORKLOADS = (  # CTranslate2's README protocol: greedy batch 1, beam 4 batch 32
    Workload("b1_greedy", 1, 1),
    Workload("b32_beam4", 32, 4),
)
PRETRAINED_SMOKE_WORKLOADS = (
    Workload("b1_greedy", 1, 1),
    Workload("b2_beam2", 2, 2),
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
    parser.add_argument(
        "--pretrained",
        choices=sorted(MARIAN_SHAPES),
        default=None,
        help="instead of --presets: a random Hugging Face Marian directory of this shape, loaded "
        "by each engine from that directory (jaxformer.load_pretrained, CTranslate2's "
        "TransformersConverter, MarianMTModel.from_pretrained)",
    )
    parser.add_argument(
        "--pretrained-dir",
        type=pathlib.Path,
        default=None,
        help="where the random Marian directory is written once and reused (default: "
        "~/.cache/jaxformer/bench_decode/SHAPE; a smoke run: a temp dir)",
    )
    parser.add_argument(
        "--writer",
        choices=("auto", "transformers", "numpy"),
        default="auto",
        help="how a missing --pretrained directory is written: transformers' save_pretrained, or "
        "numpy + safetensors (same file layout, no torch); auto: transformers when importable",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one engine
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.rounds, args.source_length, args.new_tokens = ["tiny"], 1, 8, 8
        if args.pretrained:
            args.pretrained = "marian-tiny"
        else:
            args.engines = args.engines or ["jaxformer", "ct2_float32", "ct2_int8"]
    args.out_dir = output_dir(args.out_dir, args.smoke, "bench_decode")
    return args


def available_engines(pretrained: bool = False) -> list[str]:
    engines = list(JAXFORMER_ENGINES)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        have_hf = True
    except ImportError as error:
        have_hf = False
        print(f"HF transformers / PyTorch not importable ({error}): skipped", file=sys.stderr)
    try:
        import ctranslate2  # noqa: F401

        if have_hf or not pretrained:  # CTranslate2's Transformers converter needs transformers
            engines += ["ct2_float32", "ct2_int8"]
    except ImportError:
        print("CTranslate2 is not installed: its engines are skipped", file=sys.stderr)
    if have_hf:
        engines.append("hf_torch")
    return engines


# jaxformer's engines: (dtype, quantization). The parameters and the computation (activations, KV
# cache) in dtype, the projections' products in int8 with "int8"; softmax, logits and search scores
# are float32 in all.
JAXFORMER_ENGINES = {
    "jaxformer": ("float32", None),
    "jaxformer_bf16": ("bfloat16", None),
    "jaxformer_int8": ("float32", "int8"),
}


def jaxformer_engine(engine: str, model: Transformer, params):
    """The model that jaxformer engine ``engine`` decodes with, and ``params_for(rows)``: its
    parameters for a call of ``rows`` search rows (batch x beam).

    ``jaxformer_int8`` stores its projection kernels in int8 (``quantize_params``, once) for calls
    of at least ``MIN_ROWS`` rows, where the products run in int8; smaller calls keep the float32
    parameters (their products stay float32, and int8 kernels would be dequantized in the loop).
    """
    dtype, quantization = JAXFORMER_ENGINES[engine]
    config = model.config.replace(dtype=dtype, quantization=quantization)
    params = cast(params, dtype)
    if quantization != "int8":
        return Transformer(config), lambda rows: params
    stored = jax.block_until_ready(quantize_params(params))
    return Transformer(config), lambda rows: stored if rows >= MIN_ROWS else params


def cast(params, dtype: str):
    return jax.block_until_ready(jax.tree.map(lambda x: x.astype(dtype), params))


def random_model(preset_name: str, seed: int = 0):
    config = jaxformer.preset(preset_name, dropout=0.0, attention_dropout=0.0, ffn_dropout=0.0)
    model = Transformer(config)
    params = jax.jit(init_params, static_argnums=0)(model, jax.random.key(seed))
    params = {**params, "output": jax.tree.map(lambda x: 4.0 * x, params["output"])}
    return config, model, params


def sources(batch: int, length: int, vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(FIRST_WORD, vocab, (batch, length), dtype=np.int32)


# --- engines: each returns run() -> int ids [batch, new_tokens] of the best hypothesis ---------------


def jaxformer_runner(
    model, params, src: np.ndarray, beam: int, new_tokens: int,
    start_id: int = BOS, end_id: int = EOS, suppress_ids: tuple[int, ...] = (),
):  # fmt: skip
    strategy = GreedySearch() if beam == 1 else BeamSearch(beam)
    extra = dict(suppress_ids=suppress_ids) if suppress_ids else {}

    def run():
        result = generate(
            model, params, src, start_id=start_id, end_id=end_id, max_length=new_tokens,
            min_length=new_tokens, strategy=strategy, **extra,
        )  # fmt: skip
        return np.asarray(result.ids[:, 0])

    return run


def ct2_runner(
    translator,
    vocab: list[str],
    src: np.ndarray,
    beam: int,
    new_tokens: int,
    pad: int | None = None,
):
    tokens = [[vocab[i] for i in row if i != pad] for row in src]  # CTranslate2 takes unpadded rows
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


def hf_runner(
    model, src: np.ndarray, beam: int, new_tokens: int, pad: int | None = None, device: str = "cpu"
):
    """``pad``: sources are right-padded with it (masked), and the model's own generation config
    (Marian's ``bad_words_ids=[[pad]]``) applies; None: no padding, no banned words. ``device``:
    where the model is (the sources are moved there; the ids come back to the host)."""
    import torch

    input_ids = torch.from_numpy(src.astype(np.int64)).to(device)
    mask = torch.ones_like(input_ids) if pad is None else (input_ids != pad).long()
    extra = dict(bad_words_ids=None) if pad is None else {}

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
                forced_eos_token_id=None,
                **extra,
            )
        return out[:, 1:].cpu().numpy()  # drop the start token

    return run


# --- --pretrained: a random Hugging Face Marian directory, loaded by every engine ---------------------

MARIAN_SHAPES = {  # layers (encoder = decoder), d_model, heads, ffn, vocabulary (pad last)
    "marian-base": dict(layers=6, d_model=512, heads=8, ffn=2048, vocab=58101),  # opus-mt-en-de
    "marian-tiny": dict(layers=1, d_model=16, heads=2, ffn=32, vocab=101),  # smoke runs
}
MARIAN_EOS, MARIAN_UNK = 0, 1  # OPUS-MT: </s> 0, <unk> 1, <pad> the last id (the decoder's start)


def marian_config(shape: str) -> dict:
    """``config.json`` of Helsinki-NLP/opus-mt-en-de with the shape's sizes (model fields only)."""
    s = MARIAN_SHAPES[shape]
    pad = s["vocab"] - 1
    return {
        "activation_dropout": 0.0, "activation_function": "swish", "add_bias_logits": False,
        "add_final_layer_norm": False, "architectures": ["MarianMTModel"],
        "attention_dropout": 0.0, "bad_words_ids": [[pad]], "bos_token_id": 0,
        "d_model": s["d_model"], "decoder_attention_heads": s["heads"],
        "decoder_ffn_dim": s["ffn"], "decoder_layerdrop": 0.0, "decoder_layers": s["layers"],
        "decoder_start_token_id": pad, "decoder_vocab_size": s["vocab"], "dropout": 0.1,
        "encoder_attention_heads": s["heads"], "encoder_ffn_dim": s["ffn"],
        "encoder_layerdrop": 0.0, "encoder_layers": s["layers"], "eos_token_id": MARIAN_EOS,
        "forced_eos_token_id": MARIAN_EOS, "init_std": 0.02, "is_encoder_decoder": True,
        "max_length": 512, "max_position_embeddings": 512, "model_type": "marian",
        "normalize_before": False, "normalize_embedding": False, "num_beams": 4,
        "num_hidden_layers": s["layers"], "pad_token_id": pad, "scale_embedding": True,
        "share_encoder_decoder_embeddings": True, "static_position_embeddings": True,
        "use_cache": True, "vocab_size": s["vocab"],
    }  # fmt: skip


def marian_generation_config(config: dict) -> dict:
    """``generation_config.json`` as OPUS-MT directories have it."""
    names = ("bad_words_ids", "bos_token_id", "decoder_start_token_id", "eos_token_id")
    names += ("forced_eos_token_id", "max_length", "num_beams", "pad_token_id")
    return {name: config[name] for name in names}


def write_marian_transformers(directory: pathlib.Path, config: dict) -> str:
    """``MarianMTModel(MarianConfig(...)).save_pretrained``: Hugging Face's own random init."""
    import torch
    import transformers
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    MarianMTModel(MarianConfig(**config)).save_pretrained(directory, safe_serialization=True)
    # transformers 5 keeps the generation fields out of config.json; OPUS-MT's config.json has them.
    saved = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**saved, **config}, indent=2) + "\n")
    return f"transformers {transformers.__version__}"


def write_marian_numpy(directory: pathlib.Path, config: dict, seed: int = 0) -> str:
    """The same files without torch: the tensors ``save_pretrained`` writes (tied tables once,
    no position tables), Hugging Face's init (normal(0, init_std) weights, zero biases, unit norms,
    a zero ``<pad>`` row)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d, f, v = config["d_model"], config["encoder_ffn_dim"], config["vocab_size"]
    normal = lambda *shape: (config["init_std"] * rng.standard_normal(shape)).astype(np.float32)
    zeros = lambda *shape: np.zeros(shape, np.float32)
    shared = normal(v, d)
    shared[config["pad_token_id"]] = 0.0
    tensors = {"final_logits_bias": zeros(1, v), "model.shared.weight": shared}

    def dense(name, n_in, n_out):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = normal(n_out, n_in), zeros(n_out)

    def norm(name):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = np.ones(d, np.float32), zeros(d)

    for stack in ("encoder", "decoder"):
        for i in range(config[f"{stack}_layers"]):
            layer = f"model.{stack}.layers.{i}"
            attentions = ("self_attn", "encoder_attn") if stack == "decoder" else ("self_attn",)
            for attention in attentions:
                for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    dense(f"{layer}.{attention}.{projection}", d, d)
                norm(f"{layer}.{attention}_layer_norm")
            dense(f"{layer}.fc1", d, f)
            dense(f"{layer}.fc2", f, d)
            norm(f"{layer}.final_layer_norm")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return "numpy"


def ensure_marian_dir(shape: str, directory: pathlib.Path, writer: str = "auto") -> dict:
    """The random Marian directory of ``shape`` at ``directory``, written once (reused after)."""
    config = marian_config(shape)
    stamp = directory / "bench_decode_random.json"  # what wrote it, for the results
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info["shape"] != shape:
            raise SystemExit(f"{directory} holds a random {info['shape']}, not {shape}")
        return info
    if writer == "auto":
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401

            writer = "transformers"
        except ImportError:
            writer = "numpy"
    print(f"writing a random {shape} Marian directory to {directory} ({writer})", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    write = write_marian_transformers if writer == "transformers" else write_marian_numpy
    written_by = write(directory, config)
    generation = marian_generation_config(config)
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    info = dict(
        shape=shape, directory=str(directory), written_by=written_by, sizes=MARIAN_SHAPES[shape]
    )
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def marian_tokens(vocab_size: int) -> list[str]:
    """A made-up vocabulary with OPUS-MT's special ids: ``</s>`` 0, ``<unk>`` 1, ``<pad>`` last."""
    return ["</s>", "<unk>", *(f"w{i}" for i in range(2, vocab_size - 1)), "<pad>"]


def convert_marian(hf_dir: pathlib.Path, compute_types: list[str]) -> dict:
    """CTranslate2 directories of ``hf_dir`` by CTranslate2's own ``TransformersConverter``, one per
    weight type, cached next to it. The directory has no tokenizer (random model): the converter's
    tokenizer is replaced by the made-up vocabulary, which is all its Marian loader reads from one."""
    from ctranslate2.converters import TransformersConverter

    class VocabularyOnly:
        eos_token, unk_token = "</s>", "<unk>"

        def __init__(self, vocab_size: int):
            self.vocab = {token: i for i, token in enumerate(marian_tokens(vocab_size))}

        def get_vocab(self) -> dict[str, int]:
            return self.vocab

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return VocabularyOnly(json.loads((hf_dir / "config.json").read_text())["vocab_size"])

    paths = {}
    for compute_type in compute_types:
        out = hf_dir.parent / f"{hf_dir.name}-ctranslate2-{compute_type}"
        if not (out / "model.bin").exists():
            print(f"converting {hf_dir} to {out} (CTranslate2 {compute_type})", flush=True)
            quantization = None if compute_type == "float32" else compute_type
            Converter(str(hf_dir)).convert(str(out), quantization=quantization, force=True)
        paths[compute_type] = out
    return paths


def marian_sources(batch: int, length: int, vocab_size: int, seed: int = 1) -> np.ndarray:
    """Random OPUS-MT-like sources: words, then ``</s>``, right-padded with ``<pad>`` to ``length``.

    Row 0 has ``length`` tokens; the others between ``length // 2`` and ``length``."""
    rng = np.random.default_rng(seed)
    pad = vocab_size - 1
    lengths = rng.integers(max(2, length // 2), length + 1, batch)
    lengths[0] = length
    src = np.full((batch, length), pad, np.int32)
    for row, n in zip(src, lengths, strict=True):
        row[: n - 1] = rng.integers(MARIAN_UNK + 1, pad, n - 1)
        row[n - 1] = MARIAN_EOS
    return src


def pretrained_runner_factory(engine: str, threads: int, model_dir: str | None, hf_dir: str):
    """Inside a worker, ``--pretrained``: factory(src, beam, new_tokens) -> run."""
    pad = json.loads((pathlib.Path(hf_dir) / "config.json").read_text())["pad_token_id"]
    if engine in JAXFORMER_ENGINES:
        pre = jaxformer.load_pretrained(hf_dir, dtype=JAXFORMER_ENGINES[engine][0])
        model, params_for = jaxformer_engine(engine, pre.model, pre.params)
        ids = dict(
            start_id=pre.start_id, end_id=pre.end_id, suppress_ids=pre.generation.suppress_ids
        )
        return lambda src, beam, n: jaxformer_runner(
            model, params_for(len(src) * beam), src, beam, n, **ids
        )
    if engine.startswith("ct2_"):
        import ctranslate2

        translator = ctranslate2.Translator(
            model_dir, device="cpu", compute_type=engine.removeprefix("ct2_"),
            intra_threads=threads, inter_threads=1,
        )  # fmt: skip
        vocab = translator_vocab(model_dir)  # the Marian loader drops <pad>: ids are the same
        return lambda src, beam, n: ct2_runner(translator, vocab, src, beam, n, pad=pad)
    if engine == "hf_torch":
        import torch
        from transformers import MarianMTModel

        torch.set_num_threads(threads)
        hf = MarianMTModel.from_pretrained(hf_dir).eval()
        return lambda src, beam, n: hf_runner(hf, src, beam, n, pad=pad)
    raise ValueError(f"unknown engine {engine!r}")


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


def make_runner_factory(
    engine: str, preset_name: str, threads: int, model_dir: str | None, hf_dir: str | None = None
):
    """Inside a worker: factory(src, beam, new_tokens) -> run."""
    if hf_dir is not None:
        return pretrained_runner_factory(engine, threads, model_dir, hf_dir)
    if engine in JAXFORMER_ENGINES:
        _, model, params = random_model(preset_name)
        model, params_for = jaxformer_engine(engine, model, params)
        return lambda src, beam, n: jaxformer_runner(
            model, params_for(len(src) * beam), src, beam, n
        )
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


def translator_vocab(model_dir: str) -> list[str]:
    directory = pathlib.Path(model_dir)
    for name in ("shared_vocabulary.json", "target_vocabulary.json"):
        if (directory / name).exists():
            return json.loads((directory / name).read_text())
    raise FileNotFoundError(f"no target vocabulary in {model_dir}")


def translator_vocab_size(model_dir: str) -> int:
    return len(translator_vocab(model_dir))


REPLY = "@@reply "  # marks the worker's answers on its stdout (libraries may print too)


def worker_main(
    engine: str, preset_name: str, threads: int, model_dir: str | None, hf_dir: str | None = None
):
    """``--worker``: serve timed calls of one engine, one JSON request per line on stdin.

    Each engine runs in its own process: CTranslate2 and PyTorch bring different OpenMP runtimes whose
    thread pools, loaded into one process, slow each other down by an order of magnitude.
    """
    factory = make_runner_factory(engine, preset_name, threads, model_dir, hf_dir)
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

    def __init__(self, engine: str, preset_name: str, threads: int, model_dir=None, hf_dir=None):
        command = [sys.executable, __file__, "--worker", engine, "--presets", preset_name]
        command += ["--threads", str(threads)] + (
            ["--model-dir", str(model_dir)] if model_dir else []
        )
        command += ["--hf-dir", str(hf_dir)] if hf_dir else []
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


def start_workers(engine_names, preset_name, threads, workdir, hf_dir=None) -> dict[str, Worker]:
    ct2_types = [n.removeprefix("ct2_") for n in engine_names if n.startswith("ct2_")]
    if hf_dir is not None:
        paths = convert_marian(hf_dir, ct2_types) if ct2_types else {}
    else:
        paths = export_models(preset_name, ct2_types, workdir) if ct2_types else {}
    return {
        name: Worker(name, preset_name, threads, paths.get(name.removeprefix("ct2_")), hf_dir)
        for name in engine_names
    }


def bench_preset(
    args, preset_name: str, engine_names: list[str], workloads, workdir, hf_dir=None, loads=None
) -> list[dict]:
    """``hf_dir``: every engine loads that Hugging Face Marian directory (``--pretrained``), and
    sources are right-padded Marian rows; ``loads``: gets the load average after every round."""
    workers = start_workers(engine_names, preset_name, args.threads, workdir, hf_dir)
    n = args.new_tokens
    rows = {}
    if hf_dir is not None:
        vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
        make_sources = lambda batch: marian_sources(batch, args.source_length, vocab_size)
    else:
        vocab_size = jaxformer.preset(preset_name).vocab_size
        make_sources = lambda batch: sources(batch, args.source_length, vocab_size)
    try:
        srcs = {w.name: make_sources(w.batch) for w in workloads}
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
            # Same weights (the preset's for CTranslate2; with --pretrained, HF's too): same ids?
            references = ["ct2_float32", "ct2_int8"] + (["hf_torch"] if hf_dir is not None else [])
            for ref, mine in itertools.product(references, JAXFORMER_ENGINES):
                if mine in outputs and ref in outputs:
                    same = (outputs[mine] == outputs[ref]).all(axis=1)
                    rows[(w.name, mine)][f"rows_equal_to_{ref}"] = float(same.mean())
            print(f"  {preset_name} {w.name}: warmed up", flush=True)
        names = list(workers)
        for r in range(args.rounds):
            for w in workloads:
                k = r % len(names)
                for name in names[k:] + names[:k]:  # rotate the engine order each round
                    seconds, _ = workers[name].call(srcs[w.name], w.beam, n, seed=1)
                    rows[(w.name, name)]["times"].append(seconds)
            if loads is not None:
                loads.append(load_average())
            print(f"  {preset_name}: round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    results = []
    for row in rows.values():
        times = row.pop("times")
        row.update(summary(times, row["batch"] * n))
        row["ms_per_step"] = 1e3 * row["median_s"] / n
        row["compile_s"] = row["first_call_s"] - row["median_s"]  # what the first call adds
        results.append(row)
    for row in results:
        for ct2 in ("ct2_float32", "ct2_int8"):
            ref = rows.get((row["workload"], ct2))
            if ref is not None:
                row[f"vs_{ct2}"] = row["tokens_per_s"] / ref["tokens_per_s"]
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
        _ratio(row, "vs_ct2_float32"), _ratio(row, "vs_ct2_int8"), _ratio(row, "vs_hf_torch"),
        f"{row['first_call_s']:.2f}", f"{row['compile_s']:.2f}",
    ]  # fmt: skip


def _scaling_cells(row: dict) -> list[str]:
    return [
        row["sweep"], row["new_tokens"], row["batch"], row["beam"], row["engine"],
        f"{row['median_s']:.3f}", f"{row['ms_per_step']:.2f}", f"{row['tokens_per_s']:.0f}",
    ]  # fmt: skip


SPEED_HEADERS = (
    "preset", "workload", "engine", "tokens/s", "range", "ms/call", "ms/step", "vs CT2 f32",
    "vs CT2 int8", "vs HF", "first call s", "compile s",
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
        "fastest round)."
        + (
            f" XLA_FLAGS={result['settings']['xla_flags']}."
            if result["settings"].get("xla_flags")
            else ""
        ),
        "",
        *markdown_table(SPEED_HEADERS, "lllrlrrrrrrr", map(_speed_cells, result["rows"])),
    ]
    for ref, label in (
        ("ct2_float32", "CTranslate2 float32's"),
        ("ct2_int8", "CTranslate2 int8's"),
        ("hf_torch", "HF PyTorch's"),
    ):
        agreement = [
            f"{r['preset']} {r['workload']} {r['engine']}: {r[f'rows_equal_to_{ref}']:.0%}"
            for r in result["rows"]
            if f"rows_equal_to_{ref}" in r
        ]
        if agreement:
            lines += ["", f"Rows where jaxformer's ids equal {label}: " + ", ".join(agreement)]
    pretrained = result["settings"].get("pretrained")
    if pretrained:
        lines[2:2] = [pretrained["protocol"], ""]
    loads = [result.get("load_before"), result.get("load_after")]
    if any(load and load[0] > result["machine"]["cpu_count"] for load in loads):
        lines[2:2] = [
            "**The machine was overloaded (1-minute load average above its CPU count).** OpenMP "
            "thread pools (CTranslate2's, PyTorch's) suffer most from that when they use several "
            "threads: these numbers say little about the engines on a quiet machine.",
            "",
        ]
    if result.get("scaling"):
        lines += [
            "",
            "## Scaling (small preset; median seconds per call)",
            "",
            *markdown_table(SCALING_HEADERS, "lrrrlrrr", map(_scaling_cells, result["scaling"])),
        ]
    return "\n".join(lines) + "\n"


def pretrained_protocol(args) -> str:
    return (
        f"Model: a random Hugging Face Marian directory ({args.pretrained}), loaded by jaxformer "
        "(`load_pretrained`), CTranslate2 (`TransformersConverter`) and HF (`MarianMTModel."
        "from_pretrained`): the same weights everywhere. Sources: random words + `</s>`, "
        f"{args.source_length // 2}-{args.source_length} tokens, right-padded with `<pad>` (masked;"
        " CTranslate2 gets the unpadded rows). Exactly "
        f"{args.new_tokens} new tokens per hypothesis on every side (min length = max length: "
        "jaxformer `min_length`, CTranslate2 `min_decoding_length`, HF `min_new_tokens`; HF's "
        "`forced_eos_token_id` off); `<pad>` never generated (jaxformer `suppress_ids` from the "
        "directory's `bad_words_ids`, HF `bad_words_ids`, CTranslate2 drops it from the vocabulary)."
    )


def run(args) -> dict:
    start = time.perf_counter()
    engines = args.engines or available_engines(pretrained=bool(args.pretrained))
    if args.pretrained:
        workloads = PRETRAINED_SMOKE_WORKLOADS if args.smoke else PRETRAINED_WORKLOADS
    else:
        workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    if args.workloads:
        workloads = tuple(w for w in workloads if w.name in args.workloads)
    result = dict(
        settings=dict(
            presets=[args.pretrained] if args.pretrained else args.presets,
            engines=engines,
            workloads=[w._asdict() for w in workloads],
            rounds=args.rounds,
            source_length=args.source_length,
            new_tokens=args.new_tokens,
            smoke=args.smoke,
            xla_flags=os.environ.get("XLA_FLAGS"),  # e.g. one XLA thread to match --threads 1
        ),
        machine=machine_info(args.threads, packages=("ctranslate2", "torch", "transformers")),
        load_before=load_average(),
        rows=[],
    )
    with tempfile.TemporaryDirectory(prefix="bench_decode_models_") as tmp:
        if args.pretrained:
            directory = args.pretrained_dir or (
                pathlib.Path(tmp) / args.pretrained
                if args.smoke
                else pathlib.Path.home() / ".cache/jaxformer/bench_decode" / args.pretrained
            )
            info = ensure_marian_dir(args.pretrained, directory.absolute(), args.writer)
            result["settings"]["pretrained"] = dict(info, protocol=pretrained_protocol(args))
            result["load_after_each_round"] = loads = []
            result["rows"] += bench_preset(
                args, args.pretrained, engines, workloads, pathlib.Path(tmp),
                hf_dir=pathlib.Path(info["directory"]), loads=loads,
            )  # fmt: skip
        else:
            for preset_name in args.presets:
                result["rows"] += bench_preset(
                    args, preset_name, engines, workloads, pathlib.Path(tmp)
                )
        if args.scaling:
            result["scaling"] = bench_scaling(args, engines, pathlib.Path(tmp))
    result["load_after"] = load_average()
    result["total_s"] = time.perf_counter() - start
    text = markdown(result)
    print(text)
    name = f"_{args.pretrained.replace('-', '_')}" if args.pretrained else ""
    stem = "bench_decode" + name + (f"_{args.tag}" if args.tag else "")
    write_json(args.out_dir / f"{stem}.json", result)
    (args.out_dir / f"{stem}.md").write_text(text)
    print(f"wrote {args.out_dir / stem}.md and .json in {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker_main(
            arguments.worker, arguments.presets[0], arguments.threads, arguments.model_dir,
            arguments.hf_dir,
        )  # fmt: skip
    else:
        run(arguments)
