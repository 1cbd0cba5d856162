"""The command line's options, command by command (``build_parser`` in ``__init__.py``).

Search options default to None so that a flag given on the command line can be told from a default
(``search.py``: flags win over ``--onmt-config``, which wins over the model's defaults); their help
names the default that then applies.
"""

from __future__ import annotations

import argparse

from jaxformer.cli import decode, evaluate, manage, serve

EXPORT_FORMATS = ("ctranslate2",)


def add_search_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("search")
    _add_strategy_options(group.add_argument)
    _add_output_shape_options(group.add_argument)


def _add_strategy_options(add) -> None:
    """How the next token is chosen: beams and their penalties, sampling."""
    add("--beam-size", type=int, help="1: greedy search (default: 1)")
    add("--length-penalty", type=float, help="GNMT length penalty alpha, beam search (default: 0)")
    add(
        "--coverage-penalty",
        type=float,
        help="GNMT coverage penalty beta, beam search (default: 0)",
    )
    add(
        "--sampling-topk",
        type=int,
        help="1: no sampling; 0: sample from the full vocabulary; k: from the k best (default: 1)",
    )
    add(
        "--sampling-temperature",
        "--temperature",
        type=float,
        help="softmax temperature; needs sampling (--sampling-topk 0 or k > 1) (default: 1)",
    )
    add(
        "--top-p",
        type=float,
        help="nucleus sampling: keep the best candidates holding this probability mass; needs "
        "sampling (default: 1, all)",
    )
    add("--seed", type=int, help="sampling seed (default: 0)")


def _add_output_shape_options(add) -> None:
    """What an output may be: its lengths, repeats, stop strings; where defaults come from."""
    add("--min-length", type=int, help="no end token before this many tokens (default: 0)")
    add(
        "--max-length",
        type=int,
        help="most tokens per output (default: the run's run.decode_max_length or the "
        "checkpoint's max_length, at most what the model's positions allow)",
    )
    add("--n-best", type=int, help="hypotheses per input, <= --beam-size (default: 1)")
    add(
        "--repetition-penalty",
        type=float,
        help="CTRL's penalty on tokens already in the hypothesis (an LM's prompt included): "
        "positive logits divided by it, negative ones multiplied (default: 1, off)",
    )
    add(
        "--no-repeat-ngram-size",
        type=int,
        help="no n-gram of this size twice in a hypothesis (an LM's prompt included) "
        "(default: 0, off)",
    )
    add(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end an output where it first contains TEXT, which is not written (repeatable; "
        "default: none)",
    )
    add(
        "--onmt-config",
        metavar="FILE",
        help="an OpenNMT-tf run configuration (YAML): its params (beam_width, length_penalty, "
        "maximum_decoding_length, ...) and infer (n_best, batch_size) settings are the defaults; "
        "flags win (default: none)",
    )


def add_run(parser: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        parser.add_argument("--workdir", required=True, help="a directory `jaxformer train` wrote")
    parser.add_argument(
        "--checkpoint",
        help="with --workdir: 'best' (by validation loss), 'latest' or a step (default: best)",
    )


def add_model_choice(parser: argparse.ArgumentParser, what: str) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", help=f"a directory `jaxformer train` wrote (or --model){what}")
    which.add_argument(
        "--model",
        help="a Hugging Face model directory (config.json + *.safetensors: Marian, NLLB/M2M100, "
        "BART, mBART, T5, mT5) or an OpenNMT-tf checkpoint (directory or prefix) (or --workdir)",
    )
    add_run(parser, required=False)


def add_pretrained_options(parser: argparse.ArgumentParser, languages: bool = True) -> None:
    """Options of imported checkpoints (``languages``: NLLB's source and target language)."""
    group = parser.add_argument_group("--model (imported checkpoints)")
    add = group.add_argument
    if languages:
        add("--source-lang", help="NLLB / M2M100 source language, e.g. eng_Latn (default: none)")
        add(
            "--target-lang",
            help="NLLB / M2M100 target language, e.g. fra_Latn (default: the checkpoint's forced "
            "first token, if any)",
        )
    add("--source-vocabulary", help="OpenNMT-tf: the source vocabulary file (default: none)")
    add("--target-vocabulary", help="OpenNMT-tf: the target vocabulary file (default: none)")
    add(
        "--num-heads",
        type=int,
        help="OpenNMT-tf: heads, not stored in checkpoints (default: from --model-type or the "
        "relative position tables)",
    )
    add(
        "--model-type",
        help="OpenNMT-tf: the catalog model, e.g. TransformerBase, which sets the heads "
        "(default: none)",
    )
    add(
        "--positions",
        choices=("sinusoidal", "none"),
        help="OpenNMT-tf with relative positions: whether sinusoids are on too (default: "
        "sinusoidal without relative positions, required with them)",
    )
    add(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="activations' dtype; parameters stay float32 (default: float32)",
    )


def add_text_options(parser: argparse.ArgumentParser) -> None:
    """Options of text translation with any model."""
    add = parser.add_argument
    add("--batch-size", type=int, help="lines decoded together, >= 1 (default: 32)")
    add(
        "--truncate",
        action="store_true",
        help="keep the first tokens of lines longer than the model's maximum, and count them "
        "(default: error)",
    )
    add(
        "--source-prefix",
        metavar="TEXT",
        help="text put before every source line, e.g. T5's task prefix 'translate English to "
        "German: ' (default: none)",
    )
    add(
        "--target-prefix",
        metavar="TEXT",
        help="target text forced at the start of every translation (after --target-lang's "
        "token) and kept in the output (default: none)",
    )


def add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    add = parser.add_argument
    add("--input", help=f"a UTF-8 text file, one {what} per line (default: stdin)")
    add(
        "--output",
        help="a file to write, each line as soon as every earlier one is done; its directory "
        "must exist, and it must not be --input (default: stdout)",
    )
    add(
        "--resume",
        action="store_true",
        help="keep the lines already in --output (an interrupted run's) and continue after them",
    )


def add_engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        action="store_true",
        help="decode through the continuous-batching engine: --batch-size slots (of --beam-size "
        "rows each), a finished line's slot taken by the next line at once; the same results "
        "(default: length-sorted batches)",
    )


def add_quantization_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantization",
        choices=["int8"],
        default=None,
        help="int8: the projections' products in int8, as CTranslate2's int8 (products of "
        "batches under 16 rows stay float32; default: float32 products)",
    )


def add_unk_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-unk-warning",
        action="store_true",
        help="do not warn about input symbols outside the vocabulary (they become <unk>)",
    )


def add_train(command) -> None:
    train = command("train", "train (or resume) a run")
    train.add_argument("--config", required=True, help="experiments/configs/NAME.py[:variant]")
    train.add_argument("--workdir", required=True, help="where the run is written (or resumed)")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. run.train_steps=200 or run.progress=false "
        "(repeatable; default: the config's values)",
    )
    train.set_defaults(func=manage.cmd_train)


def add_translate(command) -> None:
    translate = command("translate", "translate lines from stdin or --input")
    add_model_choice(translate, "")
    add_pretrained_options(translate)
    add_output_options(translate, "source")
    add_text_options(translate)
    translate.add_argument("--with-scores", action="store_true", help="print 'score ||| text'")
    add_engine_option(translate)
    add_quantization_option(translate)
    add_unk_option(translate)
    add_search_options(translate)
    translate.set_defaults(func=decode.cmd_translate)


def add_generate(command) -> None:
    generate = command("generate", "continue prompts with a language model")
    which = generate.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", help="a directory `jaxformer train` wrote (or --model)")
    which.add_argument(
        "--model",
        help="a Hugging Face decoder-only model directory (config.json + *.safetensors + "
        "tokenizer.json: GPT-2, Llama, Mistral, Qwen2, Gemma) (or --workdir)",
    )
    add_run(generate, required=False)
    generate.add_argument("--prompt", action="append", help="repeatable (default: stdin lines)")
    add_output_options(generate, "prompt")
    generate.add_argument(
        "--batch-size", type=int, help="prompts decoded together, >= 1 (default: 32)"
    )
    generate.add_argument(
        "--return-prompt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write each prompt before its continuation (--no-return-prompt: the continuation "
        "alone) (default: on)",
    )
    generate.add_argument("--with-scores", action="store_true", help="print 'score ||| text'")
    add_engine_option(generate)
    group = generate.add_argument_group("--model (imported checkpoints)")
    group.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="activations' dtype; parameters stay float32 (default: float32)",
    )
    add_quantization_option(generate)
    add_unk_option(generate)
    add_search_options(generate)
    generate.set_defaults(func=decode.cmd_generate)


def add_eval(command) -> None:
    evaluate_ = command(
        "eval",
        "held-out loss/perplexity (+ BLEU, chrF, exact match), or BLEU and chrF of your own "
        "test set",
    )
    add_model_choice(evaluate_, "; --model needs --source and --reference")
    add_pretrained_options(evaluate_)
    evaluate_.add_argument(
        "--split",
        choices=("valid", "test"),
        help="held-out split of the run's corpus (cached in WORKDIR/heldout.json) (default: test)",
    )
    evaluate_.add_argument(
        "--source",
        help="your own test set: source lines, with --reference (default: the --split)",
    )
    evaluate_.add_argument(
        "--reference", help="reference translations, one per --source line (default: none)"
    )
    evaluate_.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only the first N pairs (translation) or tokens (language model) (default: all)",
    )
    add_text_options(evaluate_)
    add_quantization_option(evaluate_)
    add_unk_option(evaluate_)
    add_search_options(evaluate_)
    evaluate_.set_defaults(func=evaluate.cmd_eval)


def add_export(command) -> None:
    export = command(
        "export",
        "write the model for another engine",
        "write the model for another engine (docs/training.md, 'Export to CTranslate2', shows "
        "how to use it)",
    )
    export.add_argument("format", choices=EXPORT_FORMATS, help="the engine")
    add_run(export)
    export.add_argument(
        "--out", required=True, help="output directory: new, empty, or an earlier export"
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out (a directory holding anything else is never "
        "touched)",
    )
    export.add_argument(
        "--quantization", default=None, help="e.g. int8, CTranslate2's names (default: float32)"
    )
    export.set_defaults(func=manage.cmd_export)


def add_serve(command) -> None:
    serve_ = command(
        "serve",
        "serve a model over HTTP: LibreTranslate's API (translation), OpenAI's completions API "
        "(decoder-only LMs)",
        "serve a model over HTTP on the continuous-batching engine: a translation model with "
        "LibreTranslate's API (POST /translate, GET /languages), a decoder-only model with "
        "OpenAI's completions API (POST /v1/completions, GET /v1/models), both with GET /health "
        "(200 once compiled) and GET /metrics (Prometheus). The search flags are the defaults of "
        "requests that do not name an option; requests name options as DecodeOptions does "
        "(beam_size, length_penalty, ...). SIGTERM stops admitting, finishes the requests in "
        "flight and exits 0 (README.md, 'Serving').",
    )
    which = serve_.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", help="a directory `jaxformer train` wrote (or --model)")
    which.add_argument(
        "--model",
        help="a Hugging Face directory (translation: Marian, NLLB/M2M100, BART, mBART, T5, mT5; "
        "decoder-only: GPT-2, Llama, Mistral, Qwen2, Gemma) or an OpenNMT-tf checkpoint "
        "(or --workdir)",
    )
    add_run(serve_, required=False)
    add_pretrained_options(serve_, languages=False)
    _add_api_options(serve_.add_argument_group("the API").add_argument)
    _add_engine_shape_options(serve_.add_argument_group("the engine").add_argument)
    add_quantization_option(serve_)
    add_search_options(serve_)
    serve_.set_defaults(func=serve.cmd_serve)


def _add_api_options(add) -> None:
    """Where ``jaxformer serve`` listens, what it answers to, what it logs."""
    add("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every one)")
    add("--port", type=int, default=8000, help="the port to listen on")
    add(
        "--languages",
        metavar="SOURCE:TARGET",
        help="translation models without language tokens (Marian, T5, OpenNMT-tf, a trained "
        "run): the codes of the one pair they translate, e.g. en:de; requests for any other "
        "pair are refused (default: none; NLLB / M2M100 take the languages requests name)",
    )
    add(
        "--source-prefix",
        metavar="TEXT",
        help="text put before every source, e.g. T5's 'translate English to German: ' (default: "
        "the checkpoint's task prefix for --languages, if it declares one)",
    )
    add(
        "--served-model-name",
        help="the model's name in OpenAI's API (default: the directory's name)",
    )
    add(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's and the server's log level (info: a line per request, none per token)",
    )


def _add_engine_shape_options(add) -> None:
    """What ``jaxformer serve``'s engine holds: slots, beam widths, lengths, the queue."""
    add(
        "--slots",
        type=int,
        default=8,
        help="requests decoded together with greedy search or sampling; each beam width W gets "
        "max(1, SLOTS // W) groups of W slots",
    )
    add(
        "--beam-widths",
        metavar="W,W",
        help="beam sizes requests may ask for, besides 1 and --beam-size (default: none)",
    )
    add(
        "--max-input-length",
        type=int,
        help="the longest source or prompt in tokens (default: 256, within the model's "
        "positions, less an LM's --max-length)",
    )
    add(
        "--queue-size",
        type=int,
        default=64,
        help="requests (texts, prompts, choices) that may wait for a slot; beyond, 503",
    )
    add("--chunk-size", type=int, default=8, help="steps between two admissions of requests")
    add(
        "--warmup",
        choices=("first", "all"),
        default="first",
        help="compile before reporting ready: each beam width's program for the shortest "
        "inputs (first), or for every input length bucket (all)",
    )


COMMANDS = (add_train, add_translate, add_generate, add_eval, add_export, add_serve)
