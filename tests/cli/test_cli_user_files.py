"""Nothing a user owns is destroyed, and nothing decoded is lost (issue 24): the export never deletes
what it did not write, ``--output`` may not be ``--input``, results are written as they come, an
interrupted run keeps them and ``--resume`` continues it to the file an uninterrupted run writes."""

import io

import pytest
from cli_run import trained_run

from jaxformer.cli import main
from jaxformer.decoding import ordered, texts

pytestmark = pytest.mark.xdist_group("cli_trained_run")  # the run is trained once per worker


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def run(capsys, monkeypatch, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


# --- export --------------------------------------------------------------------------------------


def test_export_never_deletes_what_it_did_not_write(workdir, capsys, monkeypatch, tmp_path):
    pytest.importorskip("ctranslate2")
    export = ["export", "ctranslate2", "--workdir", str(workdir)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    status, _, err = run(capsys, monkeypatch, [*export, "--out", str(mine)])
    assert status == 2 and "is not empty and is not an earlier CTranslate2 export" in err
    assert "notes.txt" in err and (mine / "notes.txt").read_text() == "my notes"
    status, _, err = run(capsys, monkeypatch, [*export, "--out", str(mine), "--overwrite"])
    assert status == 2 and (mine / "notes.txt").read_text() == "my notes"  # not even then
    before = sorted(p.name for p in workdir.iterdir())
    status, _, err = run(capsys, monkeypatch, [*export, "--out", str(workdir), "--overwrite"])
    assert status == 2 and sorted(p.name for p in workdir.iterdir()) == before  # the run itself

    out = tmp_path / "ct2"
    assert run(capsys, monkeypatch, [*export, "--out", str(out)])[0] == 0
    written = sorted(p.name for p in out.iterdir())
    assert "model.bin" in written and not list(tmp_path.glob(".ct2.partial-*"))
    status, _, err = run(capsys, monkeypatch, [*export, "--out", str(out)])
    assert status == 2 and "holds an earlier CTranslate2 export" in err and "--overwrite" in err
    status, printed, err = run(capsys, monkeypatch, [*export, "--out", str(out), "--overwrite"])
    assert status == 0 and printed.strip() == str(out)
    assert f"replaced the earlier export in {out} ({', '.join(written)})" in err
    assert sorted(p.name for p in out.iterdir()) == written


# --- --output is not --input ---------------------------------------------------------------------


def test_output_that_is_the_input_is_refused(workdir, capsys, monkeypatch, tmp_path):
    source = tmp_path / "numbers.txt"
    source.write_text("12\n7\n")
    (tmp_path / "link.txt").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    argv = ["translate", "--workdir", str(workdir), "--max-length", "12"]
    for given, output in (
        (str(source), str(source)),
        ("numbers.txt", str(source)),  # relative and absolute
        ("link.txt", "./numbers.txt"),  # through a link
    ):
        status, out, err = run(capsys, monkeypatch, [*argv, "--input", given, "--output", output])
        assert status == 2 and out == ""
        assert "writing would destroy the input" in err, err
        assert source.read_text() == "12\n7\n"
    status, _, err = run(capsys, monkeypatch, ["generate", "--workdir", str(workdir),
                         "--input", "numbers.txt", "--output", "link.txt"])  # fmt: skip
    assert status == 2 and "writing would destroy the input" in err


# --- results written as they come; interrupt; --resume -------------------------------------------


def _interrupt_at(monkeypatch, call: int):
    """``texts._decode_batch`` raises KeyboardInterrupt (Ctrl-C) at its ``call``-th call."""
    real, calls = texts._decode_batch, [0]

    def decode(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(texts, "_decode_batch", decode)
    return calls


def test_an_interrupted_translation_keeps_its_lines_and_resumes(
    workdir, capsys, monkeypatch, tmp_path
):
    lines = [str(n) for n in (7, 1234, 56, 9, 880, 31, 2, 4045)] * 5  # 40 lines
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(lines) + "\n")
    argv = ["translate", "--workdir", str(workdir), "--max-length", "16", "--batch-size", "2"]
    argv += ["--input", str(source)]
    status, expected, _ = run(capsys, monkeypatch, argv)  # uninterrupted, to stdout
    assert status == 0 and len(expected.splitlines()) == 40

    # Windows of 16 batches x 2 lines: Ctrl-C in the 17th batch (the second window's first), when
    # the first window is written.
    assert ordered.WINDOW_BATCHES == 16
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 17)
        status, out, err = run(capsys, monkeypatch, [*argv, "--output", str(target)])
    assert status == 130 and out == ""
    assert "interrupted: 32 of 40 lines written to" in err and "--resume" in err
    assert target.read_text() == "".join(expected.splitlines(keepends=True)[:32])

    calls = _interrupt_at(monkeypatch, 10**6)  # counts the batches the resumed run decodes
    status, _, err = run(capsys, monkeypatch, [*argv, "--output", str(target), "--resume"])
    assert status == 0 and "32 of 40 lines are in" in err
    assert target.read_text() == expected
    assert calls[0] == 4  # only the 8 remaining lines were decoded
    status, _, err = run(capsys, monkeypatch, [*argv, "--output", str(target), "--resume"])
    assert status == 0 and target.read_text() == expected  # nothing left: nothing changed


def test_resume_refuses_what_it_cannot_continue(workdir, capsys, monkeypatch, tmp_path):
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("7\n8\n")
    argv = ["translate", "--workdir", str(workdir), "--max-length", "12", "--input", str(source)]
    status, _, err = run(capsys, monkeypatch, [*argv, "--resume"])
    assert status == 2 and "--resume needs --output FILE" in err
    target.write_text("seven\neight\nnine\n")
    status, _, err = run(capsys, monkeypatch, [*argv, "--output", str(target), "--resume"])
    assert status == 2 and "answers 3 inputs, but the input has only 2" in err
    target.write_text("seven\nhalf a li")
    status, _, err = run(capsys, monkeypatch, [*argv, "--output", str(target), "--resume"])
    assert status == 2 and "ends in the middle of a line" in err
    assert target.read_text() == "seven\nhalf a li"  # left as it was


def test_generate_writes_each_prompt_as_it_comes(capsys, monkeypatch, tmp_path_factory):
    """``generate`` streams too: an interrupted run keeps the first window's continuations."""
    from cli_run import trained_lm

    workdir = trained_lm(tmp_path_factory)
    prompts = ["ROMEO.", "To be", "What", "O"] * 9  # 36 prompts, windows of 16 x 2
    target = tmp_path_factory.mktemp("gen") / "out.txt"
    argv = ["generate", "--workdir", str(workdir), "--max-length", "4", "--batch-size", "2"]
    argv += ["--output", str(target)]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 17)
        status, _, err = run(capsys, monkeypatch, argv, "\n".join(prompts) + "\n")
    assert status == 130 and "interrupted: 32 of 36 lines written" in err
    written = target.read_text().splitlines()
    assert len(written) == 32 and all(
        w.startswith(p) for w, p in zip(written, prompts[:32], strict=True)
    )
    status, _, _ = run(capsys, monkeypatch, [*argv, "--resume"], "\n".join(prompts) + "\n")
    assert status == 0 and len(target.read_text().splitlines()) == 36


def _interrupt_writing_at(monkeypatch, line: int):
    """``Output.write`` raises KeyboardInterrupt (Ctrl-C) when asked for its ``line``-th line."""
    from jaxformer.cli import files

    real, calls = files.Output.write, [0]

    def write(self, lines):
        calls[0] += 1
        if calls[0] == line:
            raise KeyboardInterrupt
        return real(self, lines)

    monkeypatch.setattr(files.Output, "write", write)


def _same_scored_lines(got: list[str], want: list[str]) -> None:
    """'score ||| text' lines: the same texts, scores within 1e-5."""
    for line, wanted in zip(got, want, strict=True):
        (score, text), (want_score, want_text) = line.split(" ||| "), wanted.split(" ||| ")
        assert text == want_text and abs(float(score) - float(want_score)) <= 1e-5


def test_the_engine_writes_the_file_static_batches_write_and_resumes(
    workdir, capsys, monkeypatch, tmp_path
):
    """``translate --engine``: every line through the continuous-batching engine, the same file;
    Ctrl-C keeps the lines written (the engine stops), ``--resume --engine`` finishes it."""
    lines = [str(n) for n in (7, 1234, 56, 9, 880, 31, 2, 4045, 123456, 17)] * 3 + [""]
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(lines) + "\n")
    argv = ["translate", "--workdir", str(workdir), "--max-length", "16", "--batch-size", "3"]
    argv += ["--input", str(source), "--beam-size", "2", "--n-best", "2", "--with-scores"]
    status, expected, _ = run(capsys, monkeypatch, argv)
    assert status == 0 and len(expected.splitlines()) == 2 * len(lines)
    status, out, _ = run(capsys, monkeypatch, [*argv, "--engine"])
    assert status == 0
    _same_scored_lines(out.splitlines(), expected.splitlines())

    with monkeypatch.context() as patch:
        _interrupt_writing_at(patch, 12)
        status, _, err = run(capsys, monkeypatch, [*argv, "--engine", "--output", str(target)])
    assert status == 130 and "interrupted: 11 of 31 lines written to" in err
    assert target.read_text().splitlines() == out.splitlines()[:22]
    status, _, err = run(
        capsys, monkeypatch, [*argv, "--engine", "--output", str(target), "--resume"]
    )
    assert status == 0 and "11 of 31 lines are in" in err
    # The resumed lines shared the engine's groups with other lines than before: same texts, the
    # scores equal up to float32 rounding.
    _same_scored_lines(target.read_text().splitlines(), out.splitlines())
    # A forced target prefix goes through the engine too; what no engine serves is refused.
    prefixed = [*argv, "--target-prefix", "с"]
    status, expected, _ = run(capsys, monkeypatch, prefixed)
    assert status == 0
    status, out, _ = run(capsys, monkeypatch, [*prefixed, "--engine"])
    texts = [line.split(" ||| ")[1] for line in out.splitlines()]
    assert status == 0 and all(text.startswith("с") for text in texts if text)
    _same_scored_lines(out.splitlines(), expected.splitlines())
    status, _, err = run(capsys, monkeypatch, [*argv, "--engine", "--repetition-penalty", "1.2"])
    assert status == 2 and "--engine: repetition_penalty" in err


def test_generate_through_the_engine_continues_as_static_batches_do(
    capsys, monkeypatch, tmp_path_factory
):
    from cli_run import trained_lm

    workdir = trained_lm(tmp_path_factory)
    capsys.readouterr()  # what training printed, if this test trained the run
    prompts = "\n".join(["ROMEO.", "To be", "What", "O", "the lazy"] * 2) + "\n"
    argv = ["generate", "--workdir", str(workdir), "--max-length", "6", "--batch-size", "2"]
    status, expected, _ = run(capsys, monkeypatch, argv, prompts)
    assert status == 0
    status, out, _ = run(capsys, monkeypatch, [*argv, "--engine"], prompts)
    assert status == 0 and out == expected
