"""`make demo`: train a small Transformer to write numbers as Russian words, then translate with it.

Command:  python experiments/demo.py [--workdir runs/demo] [--examples 500] [--show 10] [--set KEY=VALUE]

1. Trains the ``demo`` variant of ``experiments/configs/num2words.py`` (digits -> Russian words from
   num2words, 60,000 distinct numbers below a million, 2+2 layers, D 96; about 4 minutes on 2 CPU
   cores) in ``--workdir``, with a progress bar, TensorBoard/JSONL logs and orbax checkpoints.
2. Restores the best checkpoint and translates ``--examples`` held-out test numbers (never seen in
   training) with greedy search and with beam search (beam 4), and prints a few side by side.
3. Prints the exact-match accuracy and BLEU (sacrebleu) of each, and where the checkpoint, the logs
   and the learning curves are, with the command that translates your own numbers.
The bar this demo is held to: at least 90% exact match with beam search.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import jax

from jaxformer.decoding.texts import DecodeOptions, corpus_scores, translate_texts
from jaxformer.training.experiment import load_config, override
from jaxformer.training.fit import fit, load_run, prepare

CONFIG = pathlib.Path(__file__).parent / "configs" / "num2words.py"
BAR = 90.0  # percent exact match with beam search


def decode(run, sources, options):
    start = time.perf_counter()
    outputs = translate_texts(
        run.model,
        run.params,
        run.source_tokenizer,
        run.target_tokenizer,
        sources,
        options,
        batch_size=64,
    )
    return [o.texts[0] for o in outputs], time.perf_counter() - start


def table(rows, headers):
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--variant", default="demo", help="variant of configs/num2words.py")
    parser.add_argument("--examples", type=int, default=500, help="held-out examples to decode")
    parser.add_argument("--show", type=int, default=10, help="examples printed side by side")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument(
        "--length-penalty", type=float, default=0.6, help="GNMT alpha of the beam (see RunConfig)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    config = override(load_config(CONFIG, args.variant), args.set)
    workdir = pathlib.Path(args.workdir)
    if (workdir / "config.json").is_file():  # a previous demo run: start afresh
        shutil.rmtree(workdir)
    print(
        f"jaxformer demo: digits -> {config.data.language} words (num2words), "
        f"{config.run.train_steps} steps of batch {config.run.batch_size} on "
        f"{jax.devices()[0].platform} ({len(jax.devices())} device(s))",
        flush=True,
    )
    started = time.perf_counter()
    summary = fit(config, workdir)
    train_minutes = (time.perf_counter() - started) / 60

    run = load_run(workdir, "best")
    _, data = prepare(run.config, workdir)
    pairs = data.test_pairs[: args.examples]
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    greedy_opts = DecodeOptions(max_length=run.config.run.decode_max_length)
    beam_opts = DecodeOptions(
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        max_length=greedy_opts.max_length,
    )
    greedy, greedy_s = decode(run, sources, greedy_opts)
    beam, beam_s = decode(run, sources, beam_opts)
    scores = {
        "greedy": corpus_scores(greedy, references),
        f"beam {args.beam_size}": corpus_scores(beam, references),
    }

    # Examples where the two searches differ first (the interesting ones), then the rest.
    order = sorted(range(len(pairs)), key=lambda i: greedy[i] == beam[i])[: args.show]
    mark = lambda hyp, ref: ("ok " if hyp == ref else "XX ") + hyp
    rows = [
        (sources[i], references[i], mark(greedy[i], references[i]), mark(beam[i], references[i]))
        for i in sorted(order)
    ]
    print(f"\nHeld-out test numbers (never seen in training), {len(pairs)} decoded:\n")
    print(table(rows, ["source", "reference", "greedy", f"beam {args.beam_size}"]))
    print()
    print(
        table(
            [
                (name, f"{s['exact_match']:.1f}%", f"{s['bleu']:.1f}", f"{seconds:.1f} s")
                for (name, s), seconds in zip(scores.items(), (greedy_s, beam_s), strict=True)
            ],
            ["search", "exact match", "BLEU", "time (incl. compile)"],
        )
    )
    beam_exact = scores[f"beam {args.beam_size}"]["exact_match"]
    verdict = "met" if beam_exact >= BAR else "NOT met"
    print(f"\nBar (>= {BAR:.0f}% exact match with beam search): {verdict}.")
    print(
        f"\nTrained {summary['step']} steps in {train_minutes:.1f} min (stopped by "
        f"{summary['stopped_by']}); restored the best checkpoint by validation loss: step "
        f"{run.step}, {workdir / 'checkpoints' / str(run.step)}"
    )
    print(
        f"Logs: {workdir / 'metrics.jsonl'}, TensorBoard: {workdir / 'tensorboard'}, "
        f"curves: {workdir / 'curves.png'}"
    )
    print(
        f"Translate your own: echo 60051 | .venv/bin/jaxformer translate --workdir {workdir} "
        f"--beam-size {args.beam_size}"
    )
    figures = {
        "workdir": str(workdir),
        "train_steps": summary["step"],
        "train_minutes": train_minutes,
        "best_step": run.step,
        "examples": len(pairs),
        "scores": scores,
        "decode_seconds": {"greedy": greedy_s, "beam": beam_s},
        "bar_met": beam_exact >= BAR,
        "platform": jax.devices()[0].platform,
    }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
