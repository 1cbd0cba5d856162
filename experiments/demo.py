"""`make demo`: train a small Transformer to write numbers as Russian words, then translate with it.

Command:  python experiments/demo.py [--workdir runs/demo] [--examples 500] [--show 10] [--set KEY=VALUE]
          [--stop-at 95] [--overwrite]

1. Trains the ``demo`` variant of ``experiments/configs/num2words.py`` (digits -> Russian words from
   num2words, 60,000 distinct numbers below a million, 2+2 layers, D 96) in ``--workdir``, with a
   progress bar, TensorBoard/JSONL logs and orbax checkpoints. Every ``run.eval_every`` steps it
   decodes held-out validation numbers with the beam; once their exact match reaches ``--stop-at``
   percent it stops (``--stop-at none``: run all ``run.train_steps``). There is no time cap unless
   ``--set run.max_minutes=M`` sets one; the output says which of the three ended training.
2. Restores the best checkpoint and translates ``--examples`` held-out test numbers (never seen in
   training) with greedy search and with beam search (beam 4), and prints a few side by side.
3. Prints the exact-match accuracy and BLEU (sacrebleu) of each, and where the checkpoint, the logs
   and the learning curves are, with the command that translates your own numbers.
The bar this demo is held to: at least 90% exact match with beam search.

``--workdir``: a new or empty directory is trained in; a directory holding this demo's run (the same
settings) is continued, or only evaluated if that run is complete; anything else is refused and left
untouched, unless ``--overwrite`` is given: then the directory is deleted and what it held is listed.
Ctrl-C during training saves the step reached and exits with status 130; rerun to continue.
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
from jaxformer.training.fit import TrainingInterrupted, fit, prepare
from jaxformer.training.runs import check_same_run, load_run

CONFIG = pathlib.Path(__file__).parent / "configs" / "num2words.py"
BAR = 90.0  # percent exact match with beam search
STOP_AT = 95.0  # percent exact match of the validation beam that ends training
EARLY = "validation exact match"  # how a summary's stopped_by names an early stop


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


def percent_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def parse_args(argv):
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
    parser.add_argument(
        "--stop-at",
        type=percent_or_none,
        default=STOP_AT,
        metavar="PERCENT",
        help=f"stop training once the validation exact match reaches it (default {STOP_AT:g}; "
        "'none': train all run.train_steps)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete --workdir first, whatever it holds (it is listed); without it, a directory "
        "that is not this demo's run is refused",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser, parser.parse_args(argv)


def claim_workdir(parser, workdir: pathlib.Path, config, overwrite: bool) -> str:
    """``"new"`` (absent, empty or deleted with ``--overwrite``) or ``"resume"`` (this demo's run);
    anything else ends the program with a message and exit status 2, the directory untouched."""
    if not workdir.exists():
        return "new"
    if not workdir.is_dir():
        parser.error(f"--workdir {workdir} is a file, not a directory")
    contents = sorted(p.name + ("/" if p.is_dir() else "") for p in workdir.iterdir())
    if not contents:
        return "new"
    listing = ", ".join(contents[:8]) + (
        f" and {len(contents) - 8} more" if len(contents) > 8 else ""
    )
    if overwrite:
        shutil.rmtree(workdir)
        print(f"--overwrite: removed {workdir} and the {len(contents)} entries it held: {listing}")
        return "new"
    advice = f"Choose another --workdir, or pass --overwrite to delete {workdir}"
    if not (workdir / "config.json").is_file():
        parser.error(
            f"--workdir {workdir} exists and holds no jaxformer run ({listing}); it was left "
            f"untouched. {advice}"
        )
    try:
        check_same_run(workdir, config, derived=False)
    except Exception as error:  # another run, or a config.json that is no jaxformer config
        parser.error(
            f"--workdir {workdir} holds something other than this demo's run ({listing}); it was "
            f"left untouched. {advice}.\n{type(error).__name__}: {error}"
        )
    return "resume"


def early_stop(target: float | None):
    """``fit``'s ``stop_when``: stops once the validation exact match reaches ``target`` percent."""

    def stop_when(step: int, metrics: dict) -> str | None:
        exact = metrics.get("exact_match")
        if target is None or exact is None or exact < target:
            return None
        return f"{EARLY} {exact:.1f}% >= {target:g}% at step {step}"

    return stop_when


def complete(workdir: pathlib.Path, stop_when) -> dict | None:
    """The stored summary of a run that already met ``stop_when`` (nothing more to train)."""
    path = workdir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if stop_when(summary["step"], summary.get("valid") or {}) else None


def plan(config, target: float | None) -> str:
    run = config.run
    early = (
        "no early stop" if target is None else f"stops early at {target:g}% validation exact match"
    )
    cap = (
        "no time cap" if run.max_minutes is None else f"time cap run.max_minutes={run.max_minutes}"
    )
    return (
        f"up to {run.train_steps} steps of batch {run.batch_size}, evaluated every "
        f"{run.eval_every} ({run.eval_examples} examples, beam {run.beam_size}); {early}; {cap}"
    )


def stop_reason(summary: dict, config) -> str:
    """Which of the step count, the early stop or the time cap ended training, in words."""
    stopped, step, steps = summary["stopped_by"], summary["step"], config.run.train_steps
    if stopped.startswith("run.max_minutes"):
        return (
            f"the TIME CAP ({stopped} minutes) ended training at step {step} of {steps}, not the "
            "step count; rerun the same command to continue, or raise the cap"
        )
    if stopped.startswith(EARLY):
        return f"stopped early: {stopped} (of up to {steps} steps)"
    return f"the step count ended training (run.train_steps={steps})"


def train(parser, args, config, workdir: pathlib.Path) -> dict:
    """Trains (or continues, or finds complete) the demo run; exit 130 on Ctrl-C."""
    stop_when = early_stop(args.stop_at)
    if claim_workdir(parser, workdir, config, args.overwrite) == "resume":
        done = complete(workdir, stop_when)
        if done is not None:
            print(f"{workdir} holds this demo's run, complete: evaluating it without training")
            return done
        print(f"{workdir} holds this demo's run: continuing it")
    try:
        return fit(config, workdir, stop_when=stop_when)
    except TrainingInterrupted:  # fit said where it stopped and what it saved
        raise SystemExit(130) from None


def decode_test(run, workdir: pathlib.Path, args) -> dict:
    """Greedy and beam outputs on the first ``args.examples`` test pairs, with scores and times."""
    _, data = prepare(run.config, workdir)
    pairs = data.test_pairs[: args.examples]
    sources = [s for s, _ in pairs]
    greedy_opts = DecodeOptions(max_length=run.config.run.decode_max_length)
    beam_opts = DecodeOptions(
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        max_length=greedy_opts.max_length,
    )
    greedy, greedy_s = decode(run, sources, greedy_opts)
    beam, beam_s = decode(run, sources, beam_opts)
    references = [t for _, t in pairs]
    return {
        "sources": sources,
        "references": references,
        "outputs": {"greedy": greedy, f"beam {args.beam_size}": beam},
        "scores": {
            "greedy": corpus_scores(greedy, references),
            f"beam {args.beam_size}": corpus_scores(beam, references),
        },
        "seconds": {"greedy": greedy_s, "beam": beam_s},
    }


def print_results(test: dict, show: int) -> None:
    sources, references = test["sources"], test["references"]
    (greedy_name, greedy), (beam_name, beam) = test["outputs"].items()
    # Examples where the two searches differ first (the interesting ones), then the rest.
    order = sorted(range(len(sources)), key=lambda i: greedy[i] == beam[i])[:show]
    mark = lambda hyp, ref: ("ok " if hyp == ref else "XX ") + hyp
    rows = [
        (sources[i], references[i], mark(greedy[i], references[i]), mark(beam[i], references[i]))
        for i in sorted(order)
    ]
    print(f"\nHeld-out test numbers (never seen in training), {len(sources)} decoded:\n")
    print(table(rows, ["source", "reference", greedy_name, beam_name]))
    print()
    scores = [
        (name, f"{s['exact_match']:.1f}%", f"{s['bleu']:.1f}", f"{seconds:.1f} s")
        for (name, s), seconds in zip(test["scores"].items(), test["seconds"].values(), strict=True)
    ]
    print(table(scores, ["search", "exact match", "BLEU", "time (incl. compile)"]))


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    config = override(load_config(CONFIG, args.variant), args.set)
    workdir = pathlib.Path(args.workdir)
    print(
        f"jaxformer demo: digits -> {config.data.language} words (num2words) on "
        f"{jax.devices()[0].platform} ({len(jax.devices())} device(s)): {plan(config, args.stop_at)}",
        flush=True,
    )
    started = time.perf_counter()
    summary = train(parser, args, config, workdir)
    train_minutes = (time.perf_counter() - started) / 60
    run = load_run(workdir, "best")
    test = decode_test(run, workdir, args)
    print_results(test, args.show)
    beam_exact = test["scores"][f"beam {args.beam_size}"]["exact_match"]
    verdict = "met" if beam_exact >= BAR else "NOT met"
    print(f"\nBar (>= {BAR:.0f}% exact match with beam search): {verdict}.")
    total_minutes = (time.perf_counter() - started) / 60
    print(
        f"\nTrained {summary['step']} steps in {train_minutes:.1f} min: "
        f"{stop_reason(summary, config)}.\nRestored the best checkpoint by validation loss: step "
        f"{run.step}, {workdir / 'checkpoints' / str(run.step)}. Total time {total_minutes:.1f} min."
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
        "stopped_by": summary["stopped_by"],
        "train_minutes": train_minutes,
        "total_minutes": total_minutes,
        "best_step": run.step,
        "examples": len(test["sources"]),
        "scores": test["scores"],
        "decode_seconds": test["seconds"],
        "bar_met": beam_exact >= BAR,
        "platform": jax.devices()[0].platform,
    }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
