"""What a new user meets with imported models (issue 24): damaged files are one line naming the file,
options that cannot apply or are not finite are refused in the command line's words, T5's task
prefix is asked for, and eval, --top-p, --target-prefix and --onmt-config do what they say."""

import io
import json
import re
import shutil
import warnings

import jax
import numpy as np
import pytest

import jaxformer
from jaxformer import DecoderOnlyLM, Transformer, generate, init_params, preset
from jaxformer.cli import main
from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.decoding.texts import DecodeOptions, continue_texts, corpus_scores
from jaxformer.interop.opennmt_config import read_opennmt_config

from helpers import EXPERIMENTS

DATA = EXPERIMENTS.parent / "tests" / "data"
HF = DATA / "hf"
ONMT = DATA / "opennmt_tf" / "article"


def run(capsys, monkeypatch, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("jaxformer: note")]
    assert len(lines) == 1 and lines[0].startswith("jaxformer: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _copy(tmp_path, name: str):
    return shutil.copytree(HF / name, tmp_path / name)


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- damaged files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, damaged, message",
    [
        ("marian", "model.safetensors", "not a readable safetensors file"),
        ("marian", "source.spm", "not a readable sentencepiece model"),
        ("marian", "config.json", "not valid JSON"),
        ("marian", "generation_config.json", "not valid JSON"),
        ("marian", "vocab.json", "not valid JSON"),
        ("t5", "tokenizer.json", "not valid JSON"),
        ("t5", "tokenizer_config.json", "not valid JSON"),
    ],
)
def test_a_damaged_file_is_one_line_naming_it(
    tmp_path, capsys, monkeypatch, fixture, damaged, message
):
    directory = _copy(tmp_path, fixture)
    _truncate(directory / damaged)
    status, out, err = run(capsys, monkeypatch, ["translate", "--model", str(directory)], "x\n")
    assert status == 2 and out == ""
    line = one_error(err)
    assert f"{directory / damaged}: {message}" in line, line


def test_a_vocabulary_cut_short_is_refused(tmp_path, capsys, monkeypatch):
    directory = _copy(tmp_path, "marian")
    vocab = json.loads((directory / "vocab.json").read_text())
    assert len(vocab) == 66
    (directory / "vocab.json").write_text(json.dumps(dict(list(vocab.items())[:50])))
    status, out, err = run(capsys, monkeypatch, ["translate", "--model", str(directory)], "ka\n")
    assert status == 2 and out == ""
    assert f"{directory / 'vocab.json'}: 50 tokens, but the model's embedding has 66 rows" in (
        one_error(err)
    )


def test_an_opennmt_tf_checkpoint_without_vocabularies_names_the_flags(capsys, monkeypatch):
    argv = ["translate", "--model", str(ONMT), "--positions", "none"]
    status, _, err = run(capsys, monkeypatch, argv, "u d\n")
    line = one_error(err)
    assert status == 2 and "--source-vocabulary FILE and --target-vocabulary FILE" in line


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--beam-size", "2", "--length-penalty", "inf"], "--length-penalty must be a finite"),
        (["--beam-size", "2", "--coverage-penalty", "inf"], "--coverage-penalty must be a finite"),
        (["--sampling-topk", "5", "--sampling-temperature", "inf"], "--sampling-temperature must be a finite"),
        (["--sampling-topk", "5", "--sampling-temperature", "nan"], "--sampling-temperature must be a finite"),
        (["--sampling-temperature", "3"], "--sampling-temperature 3.0 applies to sampling only"),
        (["--top-p", "0.5"], "--top-p 0.5 applies to sampling only"),
        (["--length-penalty", "0.6"], "--length-penalty 0.6 applies to beam search only"),
        (["--sampling-topk", "0", "--top-p", "1.5"], r"--top-p must be a number in \(0, 1\]"),
        (["--checkpoint", "best"], "--checkpoint applies to --workdir runs only"),
        (["--num-heads", "4"], "unknown hint"),
    ],
)  # fmt: skip
def test_options_that_cannot_apply_are_refused_by_flag(capsys, monkeypatch, extra, message):
    argv = ["translate", "--model", str(HF / "marian"), *extra]
    status, out, err = run(capsys, monkeypatch, argv, "ka to\n")
    assert status == 2 and out == ""
    line = one_error(err)
    assert re.search(message, line), line
    assert "_" not in line.split("error: ", 1)[1].split(" ")[0]  # a flag, not a parameter


def test_model_options_with_a_workdir_are_refused(capsys, monkeypatch, tmp_path):
    for flag, value in (
        ("--source-lang", "eng_Latn"),
        ("--num-heads", "4"),
        ("--dtype", "bfloat16"),
    ):
        argv = ["translate", "--workdir", str(tmp_path), flag, value]
        status, _, err = run(capsys, monkeypatch, argv, "7\n")
        assert status == 2 and f"{flag} applies to --model (imported checkpoints) only" in err


def test_a_string_where_lines_are_expected_is_refused():
    pre = jaxformer.load_pretrained(HF / "marian")
    with pytest.raises(ValueError, match=r"lines must be a list of strings.*got a single str"):
        pre.translate("some text")
    with pytest.raises(ValueError, match="prompts must be a list of strings"):
        continue_texts(None, None, ByteTokenizer(), "a prompt", DecodeOptions())


def test_generate_defaults_to_what_the_model_s_positions_allow():
    for model_class, inputs, expected in (
        (Transformer, np.ones((1, 3), np.int32), 128),  # tiny: max_len 128 < OpenNMT-tf's 250
        (DecoderOnlyLM, np.ones((1, 5), np.int32), 124),  # what the 5-token prompt leaves
    ):
        model = model_class(preset("tiny", dropout=0.0, attention_dropout=0.0, ffn_dropout=0.0))
        params = init_params(model, jax.random.key(0))
        decode = lambda params, model=model, inputs=inputs: generate(
            model, params, inputs, start_id=1, end_id=2
        )
        assert jax.eval_shape(decode, params).ids.shape[-1] == expected  # traced, not compiled


# --- T5's task prefix ----------------------------------------------------------------------------


def test_t5_asks_for_its_task_prefix(tmp_path, capsys, monkeypatch):
    directory = _copy(tmp_path, "t5")
    goldens = json.loads((directory / "goldens.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    prefix = goldens["source_prefix"]
    config["task_specific_params"] = {"translation_kato_to_zorvel": {"prefix": prefix}}
    (directory / "config.json").write_text(json.dumps(config))
    pre = jaxformer.load_pretrained(directory)
    assert pre.task_prefixes == {"translation_kato_to_zorvel": prefix}
    options = pre.decode_options(max_length=24)
    with pytest.warns(UserWarning, match=f"task prefix.*declares {prefix!r}.*source_prefix="):
        pre.translate(goldens["sources"][:2], options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs = pre.translate(goldens["sources"][:2], options, source_prefix=prefix)
    assert [o.texts[0] for o in outputs] == goldens["texts"][:2]  # the prefix, put in front
    argv = ["translate", "--model", str(directory), "--max-length", "24"]
    status, out, err = run(capsys, monkeypatch, argv, goldens["sources"][0] + "\n")
    assert status == 0 and out
    assert "jaxformer: warning:" in err and "--source-prefix TEXT" in err and prefix in err


# --- eval --model, --top-p, --target-prefix --------------------------------------------------------


def test_eval_scores_an_imported_model_on_your_files(tmp_path, capsys, monkeypatch):
    goldens = json.loads((HF / "marian" / "goldens.json").read_text())
    sources, references = goldens["sources"][:6], goldens["targets"][:6]
    references[0] = "something else"
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(references) + "\n")
    argv = ["eval", "--model", str(HF / "marian"), "--source", str(tmp_path / "src.txt")]
    argv += ["--reference", str(tmp_path / "ref.txt"), "--max-length", "24"]
    status, out, err = run(capsys, monkeypatch, argv)
    assert status == 0, err
    metrics = json.loads(out)
    expected = corpus_scores(goldens["texts"][:6], references)  # transformers' translations
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["lines"] == 6 and 0 < metrics["chrf"] < 100 and metrics["exact_match"] < 100
    status, _, err = run(capsys, monkeypatch, ["eval", "--model", str(HF / "marian")])
    assert status == 2 and "--model needs --source F --reference F" in err


def test_top_p_and_target_prefix_on_the_command_line(capsys, monkeypatch):
    goldens = json.loads((HF / "marian" / "goldens.json").read_text())
    stdin = "\n".join(goldens["sources"][:4]) + "\n"
    argv = ["translate", "--model", str(HF / "marian"), "--max-length", "24"]
    _, greedy, _ = run(capsys, monkeypatch, argv, stdin)
    assert greedy.splitlines() == goldens["texts"][:4]
    # A nucleus of almost no mass keeps the best candidate only: sampling gives greedy's outputs.
    nucleus = [*argv, "--sampling-topk", "0", "--top-p", "1e-6", "--seed", "5"]
    assert run(capsys, monkeypatch, nucleus, stdin)[1] == greedy
    status, prefixed, _ = run(capsys, monkeypatch, [*argv, "--target-prefix", "zor"], stdin)
    assert status == 0
    assert all(line.startswith("zor") for line in prefixed.splitlines())
    assert prefixed != greedy


# --- OpenNMT-tf run configurations ------------------------------------------------------------------


def _onmt_config(tmp_path, text: str):
    path = tmp_path / "run.yml"
    path.write_text(text)
    return path


def test_onmt_config_gives_the_decoding_defaults(tmp_path, capsys, monkeypatch):
    goldens = json.loads((ONMT / "goldens.json").read_text())
    stdin = "\n".join(s["text"] for s in goldens["sources"][:4]) + "\n"
    config = _onmt_config(
        tmp_path,
        f"model_dir: {ONMT}\n"
        "data:\n  source_vocabulary: src_vocab.txt\n  target_vocabulary: tgt_vocab.txt\n"
        "params:\n  beam_width: 3\n  length_penalty: 0.4\n  maximum_decoding_length: 20\n"
        "  optimizer: Adam\n"  # training settings are not read
        "infer:\n  n_best: 2\n  with_scores: true\n  batch_size: 2\n",
    )
    read = read_opennmt_config(config)
    assert read.decoding == dict(beam_size=3, length_penalty=0.4, max_length=20, n_best=2)
    assert read.vocabularies == (ONMT / "src_vocab.txt", ONMT / "tgt_vocab.txt")
    base = ["translate", "--model", str(ONMT), "--positions", "none"]
    status, from_file, err = run(capsys, monkeypatch, [*base, "--onmt-config", str(config)], stdin)
    assert status == 0, err
    flags = [*base, "--source-vocabulary", str(ONMT / "src_vocab.txt"), "--target-vocabulary"]
    flags += [str(ONMT / "tgt_vocab.txt"), "--beam-size", "3", "--length-penalty", "0.4"]
    flags += ["--max-length", "20", "--n-best", "2", "--with-scores", "--batch-size", "2"]
    assert run(capsys, monkeypatch, flags, stdin)[1] == from_file
    assert len(from_file.splitlines()) == 8 and " ||| " in from_file
    # A flag wins; the file's length penalty cannot apply to greedy search and is dropped, said.
    argv = [*base, "--onmt-config", str(config), "--beam-size", "1", "--n-best", "1"]
    status, greedy, err = run(capsys, monkeypatch, argv, stdin)
    assert status == 0 and len(greedy.splitlines()) == 4
    assert "length_penalty=0.4 not applied (--beam-size 1)" in err


def test_onmt_config_settings_jaxformer_does_not_reproduce_are_refused(tmp_path):
    for text, message in (
        ("params:\n  replace_unknown_target: true\n", "params/replace_unknown_target"),
        ("params:\n  decoding_noise:\n    - dropout: 0.1\n", "params/decoding_noise"),
        ("infer:\n  n_best: 0\n", "infer/n_best: 0"),
        ("params:\n  beam_width: two\n", "params/beam_width must be an int >= 1"),
        ("params: [1, 2\n", "not valid YAML"),
    ):
        with pytest.raises(ValueError, match=message):
            read_opennmt_config(_onmt_config(tmp_path, text))


def test_the_help_examples_keep_their_line_continuations(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--target-vocabulary tgt.txt \\\n        --model-type TransformerBase" in text


# --- generate --model --engine ---------------------------------------------------------------------


@pytest.mark.parametrize("prompt_flag", ["--return-prompt", "--no-return-prompt"])
def test_generate_a_checkpoint_through_the_engine_writes_what_static_batches_write(
    capsys, monkeypatch, prompt_flag
):
    """``generate --model DIR --engine``: the same lines (and prompts echoed or not) as without."""
    prompts = "Hello\nThe weather today is\nA\n"
    argv = ["generate", "--model", str(DATA / "hf_lm" / "gpt2"), "--max-length", "6"]
    argv += ["--batch-size", "2", prompt_flag]
    status, static, _ = run(capsys, monkeypatch, argv, prompts)
    assert status == 0 and len(static.splitlines()) == 3
    status, engine, _ = run(capsys, monkeypatch, [*argv, "--engine"], prompts)
    assert status == 0 and engine == static
    starts = [
        line.startswith(p)
        for line, p in zip(static.splitlines(), prompts.split("\n"), strict=False)
    ]
    assert all(starts) == (prompt_flag == "--return-prompt")


# --- translate --model --engine --------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, flags",
    [("marian", []), ("nllb", ["--source-lang", "eng_Latn", "--target-lang", "fra_Latn"])],
)
def test_translate_a_checkpoint_through_the_engine_writes_what_static_batches_write(
    capsys, monkeypatch, fixture, flags
):
    """``translate --model DIR --engine`` with what the checkpoint forces on every output:
    Marian's suppressed padding, NLLB's target-language token (the engine's ``suppress_ids``
    and ``prefix_length``)."""
    sources = "".join(
        s + "\n" for s in json.loads((HF / fixture / "goldens.json").read_text())["sources"][:3]
    )
    argv = ["translate", "--model", str(HF / fixture), *flags, "--max-length", "24"]
    argv += ["--batch-size", "2", "--beam-size", "2", "--with-scores"]
    status, static, _ = run(capsys, monkeypatch, argv, sources)
    assert status == 0 and len(static.splitlines()) == 3
    status, engine, _ = run(capsys, monkeypatch, [*argv, "--engine"], sources)
    assert status == 0
    for a, b in zip(engine.splitlines(), static.splitlines(), strict=True):
        (score_a, text_a), (score_b, text_b) = a.split(" ||| "), b.split(" ||| ")
        assert text_a == text_b and float(score_a) == pytest.approx(float(score_b), abs=1e-4)
