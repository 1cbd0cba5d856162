"""The ``jaxformer`` command end to end (in process): train, translate, eval, generate, errors."""

import io
import json
import re

import pytest
from cli_run import trained_lm, trained_run

from jaxformer.cli import main

from helpers import EXPERIMENTS

# Its costly fixture runs once per process (session scope: a module fixture is set up again whenever
# xdist interleaves another module), so keep the module on one worker (`make test`: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("cli_trained_run")

NUM2WORDS = str(EXPERIMENTS / "configs" / "num2words.py")


def run(capsys, monkeypatch, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return trained_run(tmp_path_factory)  # shared with test_cli_newcomer.py (trained once)


def test_train_prints_a_summary_and_translate_keeps_line_order(workdir, capsys, monkeypatch):
    lines = ["7", "", "123", "45", "9"]
    status, out, _ = run(
        capsys,
        monkeypatch,
        ["translate", "--workdir", str(workdir), "--max-length", "12"],
        "\n".join(lines) + "\n",
    )
    assert status == 0
    outputs = out.split("\n")[:-1]
    assert len(outputs) == len(lines) and outputs[1] == ""  # an empty line stays empty
    # Each line translated alone gives the same output: batching does not change results.
    for line, expected in zip(lines, outputs, strict=True):
        if line:
            _, alone, _ = run(
                capsys,
                monkeypatch,
                ["translate", "--workdir", str(workdir), "--max-length", "12"],
                line + "\n",
            )
            assert alone == expected + "\n"


def test_translate_n_best_scores_and_files(workdir, capsys, monkeypatch, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("12\n345\n")
    target = tmp_path / "out.txt"
    argv = ["translate", "--workdir", str(workdir), "--beam-size", "3", "--n-best", "2"]
    argv += ["--with-scores", "--max-length", "12", "--input", str(source), "--output", str(target)]
    status, out, _ = run(capsys, monkeypatch, argv)
    assert status == 0 and out == ""
    rows = target.read_text().splitlines()
    assert len(rows) == 4
    scores = [float(r.split(" ||| ")[0]) for r in rows]
    assert scores[0] >= scores[1] and scores[2] >= scores[3]  # best first within each input


def test_eval_reports_bleu_exact_match_and_perplexity(workdir, capsys, monkeypatch):
    status, out, _ = run(
        capsys,
        monkeypatch,
        ["eval", "--workdir", str(workdir), "--split", "valid", "--max-length", "12"],
    )
    assert status == 0
    metrics = json.loads(out)
    assert {"bleu", "exact_match", "loss", "perplexity", "bits_per_token"} <= set(metrics)
    assert metrics["split"] == "valid" and 0 <= metrics["exact_match"] <= 100


def test_eval_in_int8_is_close_to_float32(workdir, capsys, monkeypatch):
    argv = ["eval", "--workdir", str(workdir), "--split", "valid", "--max-length", "12"]
    status, out, _ = run(capsys, monkeypatch, argv)
    status8, out8, _ = run(capsys, monkeypatch, [*argv, "--quantization", "int8"])
    assert status == status8 == 0
    want, got = json.loads(out), json.loads(out8)
    assert got["loss"] != want["loss"]  # the held-out loss ran through int8 products
    assert got["loss"] == pytest.approx(want["loss"], rel=0.01)  # unscaled weights: far off
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.02)
    assert {"bleu", "exact_match"} <= set(got)


def test_eval_on_your_own_test_set(workdir, capsys, monkeypatch, tmp_path):
    source, reference = tmp_path / "src.txt", tmp_path / "ref.txt"
    source.write_text("12\n345\n")
    argv = ["translate", "--workdir", str(workdir), "--max-length", "12", "--input", str(source)]
    _, translations, _ = run(capsys, monkeypatch, argv)
    first = translations.splitlines()[0]
    reference.write_text(f"{first}\nsomething else entirely\n")
    argv = ["eval", "--workdir", str(workdir), "--max-length", "12"]
    argv += ["--source", str(source), "--reference", str(reference)]
    status, out, _ = run(capsys, monkeypatch, argv)
    assert status == 0
    assert json.loads(out)["exact_match"] == 50.0 and json.loads(out)["lines"] == 2
    reference.write_text("only one line\n")
    status, _, err = run(capsys, monkeypatch, argv)
    assert status == 2 and "--source has 2 lines but --reference has 1" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["translate", "--workdir", "{missing}"], "--workdir .* does not exist"),
        (["translate", "--beam-size", "0"], "--beam-size must be an int >= 1, got 0"),
        (
            ["translate", "--beam-size", "2", "--n-best", "3"],
            r"--n-best must be an int in \[1, --beam-size 2\]",
        ),
        (
            ["translate", "--sampling-temperature", "0"],
            "--sampling-temperature must be a finite number > 0",
        ),
        (["translate", "--sampling-topk", "-1"], "--sampling-topk must be an int >= 0"),
        (["translate", "--max-length", "0"], "--max-length must be an int >= 1"),
        (
            ["translate", "--min-length", "9", "--max-length", "5"],
            r"--min-length must be in \[0, --max-length 5\]",
        ),
        (["translate", "--checkpoint", "soon"], "--checkpoint must be 'best', 'latest' or a step"),
        (["translate", "--checkpoint", "999"], r"no checkpoint for step 999"),
        (["translate", "--input", "{missing}"], "--input .*: cannot read it"),
        (["generate", "--prompt", "x"], "holds a 'translate' model; use `jaxformer translate`"),
        (
            ["train", "--config", NUM2WORDS + ":smoke", "--set", "model.dmodel=3"],
            "unknown config key 'model.dmodel'",
        ),
        (
            ["train", "--config", NUM2WORDS + ":smoke", "--set", "run.beam_size=0"],
            r"run.beam_size must be >= 1",
        ),
        (["train", "--config", "{missing}"], "--config: no config file"),
        (
            ["export", "onnx", "--out", "x"],
            r"argument format: invalid choice: 'onnx' \(choose from '?ctranslate2'?\)",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_status_2(
    workdir, capsys, monkeypatch, tmp_path, argv, message
):
    argv = [a.replace("{missing}", str(tmp_path / "missing")) for a in argv]
    if "--workdir" not in argv:
        argv += ["--workdir", str(workdir if argv[0] != "train" else tmp_path / "new")]
    status, out, err = run(capsys, monkeypatch, argv, "12\n")
    assert status == 2 and out == ""
    assert err.startswith("jaxformer: error: ")
    assert re.search(message, err), err


def test_too_long_line_is_an_error_unless_truncated(workdir, capsys, monkeypatch):
    long_line = "1" * 200  # the smoke model's max_len is 128 tokens
    status, _, err = run(capsys, monkeypatch, ["translate", "--workdir", str(workdir)], long_line)
    assert status == 2 and "input line 1 has 200 tokens, more than the model's maximum" in err
    status, out, err = run(
        capsys,
        monkeypatch,
        ["translate", "--workdir", str(workdir), "--truncate", "--max-length", "4"],
        f"{long_line}\n12\n{long_line}\n",
    )
    assert status == 0 and len(out.splitlines()) == 3
    # --truncate cuts, and says how many lines it cut (never silently)
    assert "warning: 2 of 3 lines were longer than the model allows and were cut to it" in err


def test_generate_with_a_language_model(tmp_path_factory, capsys, monkeypatch):
    workdir = trained_lm(tmp_path_factory)
    capsys.readouterr()
    argv = ["generate", "--workdir", str(workdir), "--prompt", "the ", "--prompt", "a fox"]
    argv += ["--sampling-topk", "5", "--max-length", "10", "--seed", "3"]
    status, out, _ = run(capsys, monkeypatch, argv)
    assert status == 0
    rows = out.splitlines()
    assert len(rows) == 2 and rows[0].startswith("the ") and rows[1].startswith("a fox")
    assert run(capsys, monkeypatch, argv)[1] == out  # the same seed gives the same samples
    # 2 prompts: fewer rows than int8 products need, so --quantization int8 keeps float32's samples
    assert run(capsys, monkeypatch, [*argv, "--quantization", "int8"])[1] == out
    # --stop: each continuation ends where it first holds the text, which is not written
    greedy = ["generate", "--workdir", str(workdir), "--prompt", "the quick", "--max-length", "20"]
    _, full, _ = run(capsys, monkeypatch, greedy)
    continuation = full.rstrip("\n")[len("the quick") :]
    assert continuation.index("og") >= 2  # the stop string spans two tokens (chars)
    status, stopped, _ = run(capsys, monkeypatch, [*greedy, "--stop", "og", "--stop", "zz"])
    assert status == 0
    assert stopped == "the quick" + continuation[: continuation.index("og")] + "\n"
    status, out, _ = run(
        capsys, monkeypatch, ["eval", "--workdir", str(workdir), "--split", "test"]
    )
    assert status == 0 and json.loads(out)["bits_per_token"] > 0


def test_export_to_ctranslate2_translates_like_jaxformer(workdir, capsys, monkeypatch, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")  # in the dev extra: CI runs this test
    out_dir = tmp_path / "ct2"
    status, printed, _ = run(
        capsys,
        monkeypatch,
        ["export", "ctranslate2", "--workdir", str(workdir), "--out", str(out_dir)],
    )
    assert status == 0 and printed.strip() == str(out_dir) and (out_dir / "model.bin").is_file()
    lines = ["7", "123", "45"]
    _, ours, _ = run(
        capsys,
        monkeypatch,
        ["translate", "--workdir", str(workdir), "--max-length", "12"],
        "\n".join(lines),
    )
    source_vocab = json.loads((out_dir / "source_vocabulary.json").read_text())
    index = {token: i for i, token in enumerate(source_vocab)}
    translator = ctranslate2.Translator(str(out_dir))
    results = translator.translate_batch(
        [list(line) for line in lines], beam_size=1, max_decoding_length=12
    )
    assert all(c in index for line in lines for c in line)
    theirs = ["".join(r.hypotheses[0]) for r in results]
    assert any(theirs) and theirs == ours.splitlines()


def test_translate_in_int8_gives_the_float32_translations(workdir, capsys, monkeypatch):
    lines = [str(n) for n in range(100, 2100, 100)]  # 20 lines: int8 products in every step
    argv = ["translate", "--workdir", str(workdir), "--max-length", "12"]
    status, want, _ = run(capsys, monkeypatch, argv, "\n".join(lines) + "\n")
    status8, got, _ = run(
        capsys, monkeypatch, [*argv, "--quantization", "int8"], "\n".join(lines) + "\n"
    )
    assert status == status8 == 0
    want, got = want.split("\n")[:-1], got.split("\n")[:-1]
    assert len(got) == len(lines)
    assert sum(a == b for a, b in zip(want, got, strict=True)) >= 18  # a peaked model: int8 agrees
    assert main([*argv, "--quantization", "int4"]) == 2
    assert "--quantization" in capsys.readouterr().err
