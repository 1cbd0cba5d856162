"""A new user's first hour with the ``jaxformer`` command (issue 13): defaults that work, input that
is refused clearly rather than translated wrongly, and the help a newcomer reads."""

import argparse
import io
import json
import re
import types

import pytest
from cli_run import NUM2WORDS, trained_run

from jaxformer import cli
from jaxformer.cli import main
from jaxformer.cli.common import default_max_length
from jaxformer.data import datasets
from jaxformer.data.tokenizers import ByteTokenizer, CharTokenizer, SentencePieceTokenizer
from jaxformer.decoding import texts
from jaxformer.training.experiment import load_config, override
from jaxformer.training.heldout import HELD_OUT_CACHE

pytestmark = pytest.mark.xdist_group("cli_trained_run")  # the run is trained once per worker


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def run(capsys, monkeypatch, argv, stdin: str | bytes = ""):
    if isinstance(
        stdin, bytes
    ):  # as Python reads a pipe in the C locale: undecodable bytes escaped
        stream = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape")
    else:
        stream = io.StringIO(stdin)
    monkeypatch.setattr("sys.stdin", stream)
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxformer: error: "), err
    return lines[0]


# --- 1. --max-length defaults to what the run can decode --------------------------------------------


def test_translate_and_eval_work_without_max_length(workdir, capsys, monkeypatch):
    # The smoke run stores run.decode_max_length=40 (its model's max_len is 128; the old default,
    # 250, was refused).
    argv = ["translate", "--workdir", str(workdir), "--beam-size", "2"]
    status, default, err = run(capsys, monkeypatch, argv, "60051\n7\n")
    assert status == 0, err
    status, explicit, _ = run(capsys, monkeypatch, [*argv, "--max-length", "40"], "60051\n7\n")
    assert status == 0 and default == explicit and len(default.splitlines()) == 2
    argv = ["eval", "--workdir", str(workdir), "--split", "valid", "--limit", "3"]
    status, out, err = run(capsys, monkeypatch, argv)
    assert status == 0, err
    assert json.loads(out)["examples"] == 3


def test_default_max_length_is_the_stored_decode_length_capped_by_the_model():
    def fake_run(decode_max_length, max_len=128):
        config = types.SimpleNamespace(
            run=types.SimpleNamespace(decode_max_length=decode_max_length),
            model=types.SimpleNamespace(max_len=max_len),
        )
        return types.SimpleNamespace(config=config)

    assert default_max_length(fake_run(40)) == 40
    assert default_max_length(fake_run(250)) == 128  # never more than the model allows
    assert default_max_length(fake_run(None)) == 128  # no stored length: the model's limit
    assert default_max_length(fake_run(250), prompt_tokens=28) == 101  # an LM's prompt
    with pytest.raises(ValueError, match="prompt of 200 tokens leaves no room"):
        default_max_length(fake_run(40), prompt_tokens=200)


def _subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_help_shows_every_default(capsys):
    parser = cli.build_parser()
    for name, sub in _subparsers(parser).items():
        help_text = sub.format_help()
        required_groups = [g for g in sub._mutually_exclusive_groups if g.required]
        for action in sub._actions:
            takes_value = action.nargs != 0 and action.option_strings
            if not takes_value or action.required or action.default == argparse.SUPPRESS:
                continue
            if any(action in g._group_actions for g in required_groups):
                continue  # one of the group is required (translate: --workdir or --model)
            # The option's own entry in the help, up to the next option.
            flag = action.option_strings[0]
            entry = re.search(rf"\n  {re.escape(flag)} .*?(?=\n  -|\n\n|\Z)", help_text, re.S)
            assert entry and "default" in entry.group(0), f"jaxformer {name} {flag}"


# --- 2. the README example: tests/test_readme.py ------------------------------------------------


# --- 3. --batch-size ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["translate", "eval"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_batch_size_below_one_is_refused(workdir, capsys, monkeypatch, command, value):
    argv = [command, "--workdir", str(workdir), "--batch-size", value, "--max-length", "8"]
    status, out, err = run(capsys, monkeypatch, argv, "7\n12\n")
    assert status == 2 and out == ""
    assert f"--batch-size must be an int >= 1, got {value}" in one_error_line(err)


def test_translate_texts_refuses_a_batch_size_below_one():
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got -1"):
        texts.translate_texts(None, None, ByteTokenizer(), ByteTokenizer(), ["x"], batch_size=-1)


# --- 4. input that is not UTF-8 ----------------------------------------------------------------


def test_non_utf8_input_is_refused_from_stdin_and_from_a_file(
    workdir, capsys, monkeypatch, tmp_path
):
    data = b"12\n\xff34\n"
    argv = ["translate", "--workdir", str(workdir), "--max-length", "8"]
    status, out, err = run(capsys, monkeypatch, argv, data)
    assert status == 2 and out == ""
    assert "stdin: not UTF-8 text (byte 0xff on line 2)" in one_error_line(err)
    source = tmp_path / "latin1.txt"
    source.write_bytes(data)
    status, out, err = run(capsys, monkeypatch, [*argv, "--input", str(source)])
    assert status == 2 and out == ""
    assert f"--input {source}: not UTF-8 text (byte 0xff on line 2)" in one_error_line(err)


# --- 5. symbols outside the vocabulary -----------------------------------------------------------


def test_out_of_vocabulary_input_is_counted_and_warned(workdir, capsys, monkeypatch):
    argv = ["translate", "--workdir", str(workdir), "--max-length", "8"]
    status, out, err = run(capsys, monkeypatch, argv, "12\nhello\n7\nhi 3\n")
    assert status == 0 and len(out.splitlines()) == 4  # still translated, as <unk>
    (warning,) = [line for line in err.splitlines() if "outside the vocabulary" in line]
    assert warning.startswith("jaxformer: warning: 2 of 4 lines had symbols outside the vocabulary")
    assert "'h', 'e', 'l', 'o'" in warning and "(first: line 2)" in warning
    assert "--no-unk-warning" in warning
    status, quiet, err = run(capsys, monkeypatch, [*argv, "--no-unk-warning"], "12\nhello\n")
    assert status == 0 and "vocabulary" not in err and len(quiet.splitlines()) == 2
    status, _, err = run(capsys, monkeypatch, argv, "12\n7\n")
    assert status == 0 and "vocabulary" not in err  # nothing to say: nothing said


def test_out_of_vocabulary_symbols_per_tokenizer():
    from jaxformer.data.tokenizers import out_of_vocabulary

    assert out_of_vocabulary(CharTokenizer.train("0123 "), "12 ab 3a") == ["a", "b", "a"]
    assert out_of_vocabulary(ByteTokenizer(), "héllo ✓") == []
    pytest.importorskip("sentencepiece")
    spm = SentencePieceTokenizer.train(["abc abc ab ba cab"] * 20, vocab_size=20)
    assert out_of_vocabulary(spm, "abz xc") == ["z", "x"]
    assert out_of_vocabulary(spm, "abc") == []


# --- 7. eval on a split: progress, --limit, no needless rebuild ------------------------------------


def test_eval_limit_progress_and_cached_held_out_split(workdir, capsys, monkeypatch):
    (workdir / HELD_OUT_CACHE).unlink(missing_ok=True)
    argv = ["eval", "--workdir", str(workdir), "--split", "test", "--max-length", "12"]
    status, out, err = run(capsys, monkeypatch, [*argv, "--limit", "5"])
    assert status == 0, err
    assert json.loads(out)["examples"] == 5
    assert "translating" in err  # the progress bar (stderr)
    assert (workdir / HELD_OUT_CACHE).is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the corpus was rebuilt")

    monkeypatch.setattr(datasets, "text_pairs", no_rebuild)
    status, again, err = run(capsys, monkeypatch, [*argv, "--limit", "5"])
    assert status == 0, err
    assert json.loads(again) == json.loads(out)  # from the cache, the same figures
    status, full, err = run(capsys, monkeypatch, argv)
    assert status == 0 and json.loads(full)["examples"] > 5
    status, _, err = run(capsys, monkeypatch, [*argv, "--limit", "0"])
    assert status == 2 and "--limit must be an int >= 1, got 0" in one_error_line(err)


def test_a_stale_cache_is_rebuilt(workdir, capsys, monkeypatch):
    argv = ["eval", "--workdir", str(workdir), "--split", "valid", "--limit", "4"]
    argv += ["--max-length", "12"]
    status, first, _ = run(capsys, monkeypatch, argv)
    assert status == 0
    cache = workdir / HELD_OUT_CACHE
    stored = json.loads(cache.read_text())
    stored["key"]["data"]["seed"] += 1  # as if made for other data settings
    stored["valid"] = [["1", "wrong reference"]] * 4
    cache.write_text(json.dumps(stored))
    status, second, err = run(capsys, monkeypatch, argv)
    assert status == 0, err
    assert json.loads(second) == json.loads(first)


def test_eval_of_a_split_matches_the_training_evaluation(workdir, capsys, monkeypatch):
    """The CLI builds only the held-out split; its figures are those of ``fit``'s evaluation."""
    from jaxformer.decoding.texts import DecodeOptions
    from jaxformer.training.fit import evaluate_run, prepare
    from jaxformer.training.runs import load_run

    argv = ["eval", "--workdir", str(workdir), "--split", "valid", "--max-length", "12"]
    status, out, _ = run(capsys, monkeypatch, [*argv, "--beam-size", "2"])
    assert status == 0
    loaded = load_run(workdir)
    _, data = prepare(loaded.config, workdir)
    options = DecodeOptions(beam_size=2, max_length=12)
    expected = evaluate_run(
        loaded.config, loaded.model, loaded.params, data, split="valid", options=options
    )
    ours = json.loads(out)
    assert ours["examples"] == len(data.valid_pairs)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-6), name


# --- 8. --version, examples in --help, --set, export, --output -----------------------------------


def test_version_and_examples_in_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert re.fullmatch(r"jaxformer \S+\n", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text
    assert "echo 60051 | jaxformer translate --workdir runs/demo --beam-size 4" in help_text
    assert "jaxformer export ctranslate2" in help_text


def test_set_accepts_true_and_false_and_suggests_keys():
    config = load_config(NUM2WORDS, "smoke")
    assert override(config, ["run.progress=true"]).run.progress is True
    assert override(config, ["run.progress=False", "run.plot=no"]).run.plot is False
    assert override(config, ["run.plot=OFF"]).run.plot is False
    with pytest.raises(ValueError, match=r"run.progress=maybe: expected bool \(true/false\)"):
        override(config, ["run.progress=maybe"])
    with pytest.raises(ValueError, match=r"'model.dmodel' \(did you mean 'model.d_model'"):
        override(config, ["model.dmodel=3"])
    with pytest.raises(ValueError, match=r"'train_steps' \(did you mean 'run.train_steps'\?\)"):
        override(config, ["train_steps=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'zzz.qqq'; known keys"):
        override(config, ["zzz.qqq=3"])  # nothing near: no suggestion


def test_set_errors_through_the_command(tmp_path, capsys, monkeypatch):
    argv = ["train", "--config", f"{NUM2WORDS}:smoke", "--workdir", str(tmp_path / "new")]
    status, _, err = run(capsys, monkeypatch, [*argv, "--set", "run.train_step=5"])
    assert status == 2
    assert "did you mean 'run.train_steps'?" in one_error_line(err)


def test_export_lists_its_formats(capsys, monkeypatch, workdir):
    parser = cli.build_parser()
    export = _subparsers(parser)["export"]
    (format_action,) = [a for a in export._actions if a.dest == "format"]
    assert tuple(format_action.choices) == ("ctranslate2",)
    assert "{ctranslate2}" in export.format_help()
    status, _, err = run(capsys, monkeypatch, ["export", "onnx", "--workdir", str(workdir)])
    assert status == 2 and "invalid choice: 'onnx'" in one_error_line(err)


def test_usage_errors_are_one_line(capsys, monkeypatch):
    status, out, err = run(capsys, monkeypatch, ["translate", "--beam-size", "four"])
    assert status == 2 and out == ""
    line = one_error_line(err)
    assert "--beam-size: invalid int value: 'four'" in line and "jaxformer translate --help" in line


def test_output_into_a_missing_directory_is_refused_before_translating(
    workdir, capsys, monkeypatch, tmp_path
):
    def no_translation(*args, **kwargs):
        raise AssertionError("translated before checking --output")

    monkeypatch.setattr(texts, "iter_translations", no_translation)
    target = tmp_path / "missing" / "out.txt"
    argv = ["translate", "--workdir", str(workdir), "--output", str(target)]
    status, out, err = run(capsys, monkeypatch, argv, "12\n")
    assert status == 2 and out == "" and not target.parent.exists()
    assert f"directory {target.parent} does not exist" in one_error_line(err)
    status, _, err = run(capsys, monkeypatch, [*argv[:-1], str(tmp_path)], "12\n")
    assert status == 2 and "is a directory" in one_error_line(err)


# --- 10. CTranslate2 with length_penalty=0 gives our beams -----------------------------------------


def test_ctranslate2_with_length_penalty_0_gives_our_best_beam(
    workdir, capsys, monkeypatch, tmp_path
):
    ctranslate2 = pytest.importorskip("ctranslate2")
    out_dir = tmp_path / "ct2"
    argv = ["export", "ctranslate2", "--workdir", str(workdir), "--out", str(out_dir)]
    assert run(capsys, monkeypatch, argv)[0] == 0
    lines = ["7", "123", "45", "999", "60"]
    argv = ["translate", "--workdir", str(workdir), "--beam-size", "4", "--max-length", "20"]
    status, ours, _ = run(capsys, monkeypatch, argv, "\n".join(lines) + "\n")
    assert status == 0
    translator = ctranslate2.Translator(str(out_dir))
    results = translator.translate_batch(
        [list(line) for line in lines], beam_size=4, length_penalty=0, max_decoding_length=20
    )
    assert ["".join(r.hypotheses[0]) for r in results] == ours.splitlines()
