"""The command line's text files: UTF-8 input, an output that is not the input, written line by line.

``Output`` writes each result as soon as it comes (the decoders yield them in input order, each once
every earlier one is done) and flushes it, so an interrupted run keeps what it translated; with
``--resume`` it appends after the complete lines a previous run wrote, and the command skips the
inputs those lines answer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxformer.cli.common import UsageError


def read_lines(path: str | None, option: str = "--input") -> list[str]:
    """The lines of ``path`` (``None`` or ``-``: stdin), which must be UTF-8: bytes that are not
    are an error naming where they are, from a file and from stdin alike."""
    if path is None or path == "-":
        where = "stdin"
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # a text stream without bytes underneath (tests, notebooks)
            text = sys.stdin.read()
            data = text.encode("utf-8", errors="surrogateescape")
        else:
            data = buffer.read()
    else:
        where = f"{option} {path}"
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise UsageError(f"{where}: cannot read it ({error})") from error
    return _decode(data, where).splitlines()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UsageError(
            f"{where}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
            "convert it first, e.g. with iconv -f LATIN1 -t UTF-8"
        ) from None


def is_stdout(path: str | None) -> bool:
    return path is None or path == "-"


def check_output(path: str | None, inputs: dict[str, str | None] | None = None) -> None:
    """Refuses an ``--output`` that cannot be written or that is one of the ``inputs`` (``{flag:
    path}``: the same file, also through a link or another spelling), before any work is done."""
    if is_stdout(path):
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--output {path} is a directory; give a file name")
    if not target.parent.is_dir():
        raise UsageError(
            f"--output {path}: directory {target.parent} does not exist (create it first)"
        )
    for flag, source in (inputs or {}).items():
        if source is None or source == "-" or not target.exists() or not Path(source).exists():
            continue
        if os.path.samefile(source, target):
            raise UsageError(
                f"--output {path} is {flag} {source}: writing would destroy the input; "
                "choose another output file"
            )


class Output:
    """Lines to ``--output`` (or stdout), each flushed once written.

    ``resume``: keep the complete lines already in the file and append after them; ``done`` is
    then the number of inputs they answer (``per_input`` lines each: ``--n-best``).
    """

    def __init__(self, path: str | None, *, resume: bool = False, per_input: int = 1):
        self.path, self.written, self.done = path, 0, 0
        if resume:
            if is_stdout(path):
                raise UsageError("--resume needs --output FILE (the file to continue)")
            self.done = _complete_inputs(Path(path), per_input)
        if is_stdout(path):
            self.stream = sys.stdout
        else:
            self.stream = open(path, "a" if resume else "w", encoding="utf-8")

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()
        self.written += 1

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()
        else:
            self.stream.flush()

    def where(self) -> str:
        return "stdout" if is_stdout(self.path) else self.path


def _complete_inputs(path: Path, per_input: int) -> int:
    """How many inputs the lines of an earlier run's ``path`` answer (0 if it does not exist)."""
    if not path.exists():
        return 0
    text = _decode(path.read_bytes(), f"--output {path}")
    if text and not text.endswith("\n"):
        raise UsageError(
            f"--resume: --output {path} ends in the middle of a line (not written by jaxformer, "
            "or cut off); remove the incomplete last line to continue"
        )
    lines = text.count("\n")
    if lines % per_input:
        raise UsageError(
            f"--resume: --output {path} has {lines} lines, not a multiple of --n-best {per_input}"
        )
    return lines // per_input


def check_resumable(done: int, total: int, path: str | None) -> None:
    if done > total:
        raise UsageError(
            f"--resume: --output {path} already answers {done} inputs, but the input has only "
            f"{total}: is it the output of another input?"
        )
