"""Train and evaluate a translation model: num2words digits -> words (default) or Bible en -> ru.

Commands:
    python experiments/translate.py --workdir runs/num2words                     # configs/num2words.py
    python experiments/translate.py --config experiments/configs/bible_en_ru.py --workdir runs/bible
    python experiments/translate.py --config experiments/configs/num2words.py:smoke --workdir /tmp/s

Trains with ``jaxformer.training.fit.fit`` (resuming if ``--workdir`` holds a run), then decodes the
held-out test split with greedy and beam search and prints loss, perplexity, BLEU and exact match
for each; ``--json`` writes them. ``jaxformer train`` runs the same training from the command line.
"""

from __future__ import annotations

import pathlib
import sys

from jaxformer.decoding.texts import DecodeOptions
from jaxformer.training.fit import evaluate_run

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py
from common import fit_config, training_parser, write_json

DEFAULT = pathlib.Path(__file__).parent / "configs" / "num2words.py"


def main(argv=None) -> dict:
    parser = training_parser(__doc__, DEFAULT)
    parser.add_argument("--examples", type=int, default=None, help="test pairs decoded (all)")
    args = parser.parse_args(argv)

    summary, run, data = fit_config(parser, args, "translate", "lm.py")
    rc = run.config.run
    results = {"train": summary, "best_step": run.step, "test": {}}
    searches = {
        "greedy": DecodeOptions(max_length=rc.decode_max_length),
        f"beam {rc.beam_size}": DecodeOptions(
            beam_size=rc.beam_size,
            length_penalty=rc.length_penalty,
            max_length=rc.decode_max_length,
        ),
    }
    for name, options in searches.items():
        metrics = evaluate_run(
            run.config,
            run.model,
            run.params,
            data,
            split="test",
            examples=args.examples,
            options=options,
        )
        results["test"][name] = metrics
        print(
            f"test {name:>7}: loss {metrics['loss']:.3f}  ppl {metrics['perplexity']:.2f}  "
            f"BLEU {metrics['bleu']:.1f}  exact match {metrics['exact_match']:.1f}%"
        )
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
