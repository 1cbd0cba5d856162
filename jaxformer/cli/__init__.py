"""The jaxformer command: train, translate, generate, eval, export.

examples:
    jaxformer train --config experiments/configs/num2words.py:demo --workdir runs/demo \\
        --set run.train_steps=3000 --set model.d_model=128 --set run.progress=false
    echo 60051 | jaxformer translate --workdir runs/demo --beam-size 4
    jaxformer translate --workdir runs/demo --input numbers.txt --output out/words.txt [--resume]
    jaxformer translate --model opus-mt-en-de --beam-size 4 < english.txt
    jaxformer translate --model nllb-200-distilled-600M --source-lang eng_Latn --target-lang fra_Latn
    jaxformer translate --model t5-small --source-prefix "translate English to German: "
    jaxformer translate --model onmt-run/ --source-vocabulary src.txt --target-vocabulary tgt.txt \\
        --model-type TransformerBase < tokenized.txt
    jaxformer translate --model onmt-run/ --onmt-config run.yml --model-type TransformerBase
    jaxformer eval --workdir runs/demo --split test --beam-size 4 --limit 200
    jaxformer eval --model opus-mt-en-de --source src.txt --reference ref.txt --beam-size 4
    jaxformer generate --workdir runs/shakespeare --prompt "ROMEO." --sampling-topk 10
    jaxformer export ctranslate2 --workdir runs/demo --out runs/demo/ct2
    jaxformer serve --model nllb-200-distilled-600M --beam-size 4 --port 5000   # LibreTranslate API
    jaxformer serve --model Llama-3.2-1B --port 8000                           # OpenAI API

`jaxformer COMMAND --help` lists a command's options and their defaults. Outputs are written line
by line in input order; Ctrl-C keeps what was written and `--resume` continues it. Bad input (a
missing workdir or checkpoint, a damaged model file, an option that does not apply, an invalid
value, input that is not UTF-8, an input line longer than the model's maximum, an --output that is
the --input) ends with a one-line `jaxformer: error: ...` on stderr and exit status 2, never a
traceback or a wrong answer. Input symbols outside the vocabulary are translated as <unk>, with a
warning on stderr.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from jaxformer.cli.arguments import COMMANDS, EXPORT_FORMATS
from jaxformer.cli.common import HelpFormatter, Parser, UsageError, as_flags
from jaxformer.cli.decode import cmd_generate, cmd_translate
from jaxformer.cli.evaluate import cmd_eval
from jaxformer.cli.manage import cmd_export, cmd_train
from jaxformer.data.corpora import MissingDependency

DECODING = (
    "translate",
    "generate",
    "eval",
    "serve",
)  # commands whose errors are reworded with flags


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxformer")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> Parser:
    summary, _, epilog = __doc__.partition("\n\n")
    parser = Parser(
        prog="jaxformer", description=summary, epilog=epilog, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"jaxformer {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None):
        return sub.add_parser(
            name, help=help, description=description or help, formatter_class=HelpFormatter
        )

    for add in COMMANDS:
        add(command)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings on the command line: one ``jaxformer: warning:`` line each."""
    print(f"jaxformer: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    command = None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = build_parser().parse_args(argv)
            command = args.command
            return args.func(args)
    except (ValueError, FileNotFoundError, MissingDependency) as error:
        message = str(error).strip() or type(error).__name__
        if command in DECODING and not isinstance(error, UsageError):
            message = as_flags(message)
        print(f"jaxformer: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before decoding started, or outside it (fit saves and says so)
        print("jaxformer: interrupted", file=sys.stderr)
        return 130


__all__ = [
    "EXPORT_FORMATS",
    "UsageError",
    "build_parser",
    "cmd_eval",
    "cmd_export",
    "cmd_generate",
    "cmd_train",
    "cmd_translate",
    "main",
]
