"""Corpus throughput: the continuous-batching engine vs static batching vs CTranslate2 (issue 27).

Command:  python experiments/bench_engine.py            (trains the model once, ~5-10 min on 2 busy
                                                         cores; then 3 rounds, a few minutes)
          python experiments/bench_engine.py --smoke    (a random tiny model, 24 lines: seconds)
Needs:    num2words and CTranslate2 (pip install '.[bench]'; without ctranslate2 its rows are left out)

Model. The num2words ``demo`` config (digits -> Russian number words, one token per character; D 96,
2+2 layers, F 384, max_len 128) trained for ``--train-steps`` steps and kept in ``--model-dir``
(default ``~/.cache/jaxformer/bench_engine``), then exported there with ``jaxformer export
ctranslate2``: the same weights for every system. A trained model, so that every system ends its
hypotheses where the model does, not at a length the benchmark imposes.

Corpus. ``--lines`` numbers drawn log-uniformly from [1, 999,999] (seed 0): sources of 1 to 6 digits,
translations of 4 to about 75 characters, a spread like a real corpus's 5 to 80 tokens per sentence
(the percentiles of the best hypotheses' lengths are recorded). A static batch decodes until its
longest hypothesis ends; that waste is what continuous batching removes.

Systems, each over the whole corpus with the same options (``max_length`` 100, no penalty):
- ``static``: jaxformer today, ``decoding.texts.iter_translations``: windows of 16 batches of
  ``--batch-size`` lines sorted by length (what ``jaxformer translate`` does).
- ``engine``: ``jaxformer.serving.Engine`` with ``--batch-size`` groups of W slots (W the beam
  width), ``chunk_size`` 8; every line is submitted at once and the results are read in input order.
  The engine is made once and reused by every round (its compiles are in the warm-up).
- ``ct2``: ``ctranslate2.Translator.translate_batch`` over the corpus with ``max_batch_size`` =
  ``--batch-size`` lines (``batch_type="examples"``) and ``ct2_tokens``: ``max_batch_size`` =
  ``--batch-size`` x the mean source length (``batch_type="tokens"``): it sorts by length within its
  read batch of ``max_batch_size`` x 16 lines and drops finished hypotheses from the batch.
Workloads: ``greedy`` and ``beam4``.

Timing. Each system decodes each workload once untimed (compiles, caches), then ``--rounds`` rounds;
in each round every system runs every workload once, the system order rotating from round to round,
so that a change in the machine's load hits every system alike. Reported: the median of the rounds,
their spread, lines/s and target tokens/s (the best hypotheses' tokens, EOS not counted). One
process: XLA and CTranslate2 (``intra_threads`` = ``--threads``, default the CPU count) never run at
the same time. The load average before and after each round is recorded (the CPU may be shared).

Checks. The fraction of lines whose best hypothesis equals static batching's (engine: it should be
1.0 up to float ties; CTranslate2: same weights, another implementation).

Writes ``experiments/results/bench_engine.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py

import jax
import numpy as np
from common import load_average, machine_info, markdown_table, output_dir, write_json

from jaxformer.decoding import texts
from jaxformer.decoding.decode_options import DecodeOptions

CONFIG = pathlib.Path(__file__).parent / "configs" / "num2words.py"
WORKLOADS = {"greedy": 1, "beam4": 4}
MAX_LENGTH = 100


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--smoke", action="store_true", help="a random tiny model and 24 lines (seconds)")
    add("--lines", type=int, default=1024, help="corpus size (default 1024)")
    add("--batch-size", type=int, default=32, help="lines per batch / engine groups (default 32)")
    add("--rounds", type=int, default=3)
    add("--train-steps", type=int, default=750)
    add("--threads", type=int, default=None, help="CTranslate2's intra_threads (default: CPUs)")
    add("--model-dir", default=None, help="default ~/.cache/jaxformer/bench_engine")
    add("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    add("--systems", nargs="+", default=["static", "engine", "ct2", "ct2_tokens"])
    add("--out-dir", default=None)
    add("--tag", default="")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lines, args.batch_size, args.rounds = min(args.lines, 24), min(args.batch_size, 4), 1
    return args


# --- the model and the corpus ---------------------------------------------------------------------


def trained_model(args):
    """``(model, params, source_tokenizer, target_tokenizer, ct2_dir or None)``."""
    if args.smoke:
        return _random_model()
    from jaxformer.cli import main
    from jaxformer.training.runs import load_run

    root = pathlib.Path(args.model_dir or pathlib.Path.home() / ".cache/jaxformer/bench_engine")
    workdir, ct2_dir = root / f"num2words_demo_{args.train_steps}", root / "ct2"
    if not (workdir / "checkpoints").is_dir():
        argv = ["train", "--config", f"{CONFIG}:demo", "--workdir", str(workdir)]
        argv += ["--set", f"run.train_steps={args.train_steps}", "--set", "run.progress=false"]
        if main(argv) != 0:
            raise SystemExit("training failed")
    run = load_run(workdir, "best")
    if _has_ct2() and not (ct2_dir / "model.bin").is_file():
        export = ["export", "ctranslate2", "--workdir", str(workdir), "--out", str(ct2_dir)]
        if main([*export, "--overwrite"] if ct2_dir.exists() else export) != 0:
            raise SystemExit("export failed")
    ct2 = ct2_dir if _has_ct2() else None
    return run.model, run.params, run.source_tokenizer, run.target_tokenizer, ct2


def _random_model():
    """A random tiny model over the digits and Cyrillic letters, its output sharpened, with an EOS
    bias so that hypotheses end at varied lengths (smoke runs: no CTranslate2)."""
    from jaxformer import Transformer, init_params, preset
    from jaxformer.data.tokenizers import EOS_ID, CharTokenizer

    tokenizer = CharTokenizer.train(["0123456789 абвгдежзиклмнопрстуфхцчшыьэюя"])
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, max_len=128))
    params = init_params(model, jax.random.key(0))
    output = jax.tree.map(lambda w: 3 * w, params["output"])
    output["bias"] = output["bias"].at[EOS_ID].add(2.0)
    return model, {**params, "output": output}, tokenizer, tokenizer, None


def _has_ct2() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def corpus(lines: int, seed: int = 0) -> list[str]:
    """Numbers drawn log-uniformly from [1, 999,999], as digit strings."""
    rng = np.random.default_rng(seed)
    return [str(int(math.exp(x))) for x in rng.uniform(0, math.log(999_999), lines)]


# --- the systems ----------------------------------------------------------------------------------


def static_system(model, params, src_tok, tgt_tok, batch_size):
    def run(lines, options):
        outputs = texts.iter_translations(
            model, params, src_tok, tgt_tok, lines, options, batch_size=batch_size
        )
        return [o.texts[0] for o in outputs]

    return run


class EngineSystem:
    """One engine per workload, made at its first call and reused (the engine's compiles happen
    once, in the warm-up)."""

    def __init__(self, model, params, src_tok, tgt_tok, batch_size):
        self.model, self.params, self.batch_size = model, params, batch_size
        self.src_tok, self.tgt_tok = src_tok, tgt_tok
        self.engines = {}

    def __call__(self, lines, options):
        from jaxformer.serving import Engine

        sources = [self.src_tok.encode(line) for line in lines]
        engine = self.engines.get(options.beam_size)
        if engine is None:
            engine = self.engines[options.beam_size] = Engine(
                self.model, self.params, start_id=1, end_id=2,
                groups={options.beam_size: self.batch_size}, max_length=MAX_LENGTH,
                max_input_length=max(16, -(-max(map(len, sources)) // 16) * 16),
            )  # fmt: skip
        handles = [engine.submit(ids, options) for ids in sources]
        out = []
        for handle in handles:
            r = handle.result()
            out.append(self.tgt_tok.decode(r.ids[0, 0, : r.lengths[0, 0]].tolist()))
        return out

    def close(self):
        for engine in self.engines.values():
            engine.close()


def ct2_system(ct2_dir, threads, batch_size, batch_type, mean_source):
    import ctranslate2

    translator = ctranslate2.Translator(str(ct2_dir), intra_threads=threads or 0)
    size = batch_size if batch_type == "examples" else max(1, round(batch_size * mean_source))

    def run(lines, options):
        results = translator.translate_batch(
            [list(line) for line in lines], beam_size=options.beam_size, length_penalty=0.0,
            max_decoding_length=MAX_LENGTH, max_batch_size=size, batch_type=batch_type,
        )  # fmt: skip
        return ["".join(r.hypotheses[0]) for r in results]

    return run


# --- the benchmark --------------------------------------------------------------------------------


def run(args) -> dict:
    model, params, src_tok, tgt_tok, ct2_dir = trained_model(args)
    lines = corpus(args.lines)
    mean_source = float(np.mean([len(line) for line in lines]))
    systems = {"static": static_system(model, params, src_tok, tgt_tok, args.batch_size)}
    engine = EngineSystem(model, params, src_tok, tgt_tok, args.batch_size)
    systems["engine"] = engine
    if ct2_dir is not None:
        systems["ct2"] = ct2_system(ct2_dir, args.threads, args.batch_size, "examples", 0)
        systems["ct2_tokens"] = ct2_system(
            ct2_dir, args.threads, args.batch_size, "tokens", mean_source
        )
    systems = {name: s for name, s in systems.items() if name in args.systems}
    options = {
        w: DecodeOptions(beam_size=beam, max_length=MAX_LENGTH)
        for w, beam in WORKLOADS.items()
        if w in args.workloads
    }
    rows, outputs, loads = {}, {}, [load_average()]
    try:
        for w, o in options.items():  # warm-up: compiles and caches, untimed
            for name, system in systems.items():
                start = time.perf_counter()
                outputs[(w, name)] = system(lines, o)
                rows[(w, name)] = dict(
                    workload=w, system=name, beam=o.beam_size,
                    first_call_s=time.perf_counter() - start, times=[],
                )  # fmt: skip
            print(f"  {w}: warmed up", flush=True)
        names = list(systems)
        for r in range(args.rounds):
            for w, o in options.items():
                k = r % len(names)
                for name in names[k:] + names[:k]:  # rotate the system order each round
                    start = time.perf_counter()
                    systems[name](lines, o)
                    rows[(w, name)]["times"].append(time.perf_counter() - start)
            loads.append(load_average())
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    finally:
        engine.close()
    results = []
    for (w, name), row in rows.items():
        times = row.pop("times")
        best = outputs[(w, name)]
        tokens = sum(len(text) for text in outputs[(w, "static")]) if "static" in systems else 0
        median = float(np.median(times))
        row.update(
            median_s=median, min_s=min(times), max_s=max(times), times_s=times,
            lines_per_s=len(lines) / median, tokens_per_s=tokens / median,
        )  # fmt: skip
        if "static" in systems:
            same = [a == b for a, b in zip(best, outputs[(w, "static")], strict=True)]
            row["lines_equal_to_static"] = float(np.mean(same))
        results.append(row)
    for row in results:
        for ref in ("static", "ct2", "ct2_tokens"):
            other = rows.get((row["workload"], ref))
            if other is not None:
                row[f"vs_{ref}"] = other["median_s"] / row["median_s"]
    lengths = [len(t) for t in outputs[(next(iter(options)), next(iter(systems)))]]
    percentiles = {str(p): float(np.percentile(lengths, p)) for p in (0, 10, 50, 90, 100)}
    report = dict(
        machine=machine_info(args.threads, packages=("ctranslate2",)),
        args=vars(args),
        corpus=dict(
            lines=len(lines), mean_source_chars=mean_source, target_chars_percentiles=percentiles
        ),
        loads=loads,
        rows=results,
    )
    write(report, args)
    return report


def write(report: dict, args) -> None:
    out = output_dir(args.out_dir, args.smoke, "bench_engine")
    name = f"bench_engine{'_' + args.tag if args.tag else ''}"
    write_json(out / f"{name}.json", report)
    ratio = lambda row, key: f"{row[key]:.2f}x" if key in row else "-"
    table = markdown_table(
        ["workload", "system", "lines/s", "tokens/s", "median s", "min-max s", "vs static",
         "vs CT2", "vs CT2 tokens", "= static", "first call s"],
        "llrrrrrrrrr",
        [
            (r["workload"], r["system"], f"{r['lines_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
             f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}", ratio(r, "vs_static"),
             ratio(r, "vs_ct2"), ratio(r, "vs_ct2_tokens"),
             f"{r.get('lines_equal_to_static', float('nan')):.3f}", f"{r['first_call_s']:.1f}")
            for r in report["rows"]
        ],
    )  # fmt: skip
    corpus_ = report["corpus"]
    text = [
        "# Continuous batching vs static batching vs CTranslate2",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} CPUs; load "
        f"averages per round: {report['loads']}.",
        f"Corpus: {corpus_['lines']} lines, mean source {corpus_['mean_source_chars']:.1f} "
        f"characters; best hypotheses' lengths (percentiles 0/10/50/90/100): "
        f"{corpus_['target_chars_percentiles']}. Batch size / engine groups: {args.batch_size}.",
        "",
        *table,
        "",
        "`vs X`: X's median time over this row's (above 1: this row is faster). `python "
        "experiments/bench_engine.py` wrote this (its docstring has the protocol).",
    ]
    (out / f"{name}.md").write_text("\n".join(text) + "\n")
    print("\n".join(table))
    print(f"wrote {out / name}.md and .json")


if __name__ == "__main__":
    run(parse_args())
