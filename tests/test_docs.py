"""Every code block of README.md, docs/*.md and experiments/README.md runs as written, from the
repository root, or says why it cannot; and the links between the pages lead somewhere.

A fenced block names its language: ``python``, ``bash`` / ``sh`` (run), or ``text`` (a tree, a
protocol sketch: never run). A block that cannot run in CI (minutes of training, a GPU, several
hosts, the network) is preceded by ``<!-- no-run: the reason -->``. Each ``python`` block runs in a
fresh namespace, as if pasted into a new interpreter, unless ``<!-- continues -->`` precedes it: then
it runs in the namespace of the page's previous python block. A page's python blocks share one
process (one import of JAX, one compile cache); each bash block runs in its own ``bash -e -o
pipefail``. What some blocks print is checked below (``EXPECTED``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    "experiments/README.md",
]
RUN = {"python", "bash", "sh"}
LANGUAGES = RUN | {"text"}
NO_RUN = re.compile(r"^<!-- no-run: (.*) -->$")
CONTINUES = "<!-- continues -->"
PYTHON_TIMEOUT_S = 240  # one page's python blocks together
BASH_TIMEOUT_S = 120  # one bash block


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the block's first code line, 1-based
    language: str
    code: str
    heading: str  # the section it is in
    no_run: str | None  # the reason it does not run, or None
    continues: bool  # runs in the namespace of the page's previous python block

    def __str__(self):
        return f"{self.page}:{self.line} ({self.heading})"


@functools.cache
def blocks(page: str) -> tuple[Block, ...]:
    """The fenced blocks of ``page``, with their markers; fences without a language are refused."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    found, heading, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("```"):
            i += 1
            continue
        language = line[3:].strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page}:{i + 1}: a fence that is never closed"
        before = lines[i - 1].strip() if i > 0 else ""
        reason = NO_RUN.match(before)
        found.append(
            Block(
                page=page,
                line=i + 2,
                language=language,
                code="\n".join(lines[i + 1 : end]) + "\n",
                heading=heading,
                no_run=reason.group(1).strip() if reason else None,
                continues=before == CONTINUES,
            )
        )
        i = end + 1
    return tuple(found)


def test_every_block_says_its_language_and_every_skip_its_reason():
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8").splitlines()
        starts = {block.line - 2 for block in blocks(page)}  # the fences' 0-based lines
        for number, line in enumerate(text):
            if line.strip().startswith("<!-- no-run") or line.strip() == CONTINUES:
                # a marker sits right before a fence, so that it is seen with its block
                assert number + 1 in starts, f"{page}:{number + 1}: a marker not before a fence"
        previous_python = None
        for block in blocks(page):
            assert block.language in LANGUAGES, (
                f"{block}: a fence must name its language ({', '.join(sorted(LANGUAGES))}), "
                f"got {block.language!r}"
            )
            if block.no_run is not None:
                assert block.language in RUN, f"{block}: only runnable blocks take no-run"
                assert len(block.no_run.split()) >= 2, f"{block}: say why it cannot run"
            if block.continues:
                assert block.language == "python", f"{block}: only python blocks continue"
                assert previous_python is not None, f"{block}: continues no python block"
                assert (previous_python.no_run is None) == (block.no_run is None), (
                    f"{block}: a block that continues another runs if and only if that one does"
                )
            if block.language == "python":
                previous_python = block


def runnable(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.language in RUN and b.no_run is None]


RUNNER = r"""
import contextlib, io, json, sys, traceback

blocks = json.load(sys.stdin)
results, namespace = [], None
for block in blocks:
    if not block["continues"] or namespace is None:
        namespace = {"__name__": "__main__"}
    out = io.StringIO()
    source = "\n" * (block["line"] - 1) + block["code"]  # tracebacks name the page's lines
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, block["page"], "exec"), namespace)
    except BaseException:
        results.append(dict(stdout=out.getvalue(), error=traceback.format_exc()))
        break
    results.append(dict(stdout=out.getvalue(), error=None))
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(results, f)
"""


def environment() -> dict[str, str]:
    """A user's shell after ``make``: this interpreter's ``python`` and ``jaxformer`` first on the
    PATH, and this checkout's package imported (not another one installed in the venv)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = (
        f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if "PYTHONPATH" in env else str(ROOT)
    )
    return env


def repository_changes() -> set[str]:
    """Files git sees as new or changed (not ignored); empty outside a git checkout."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return set(done.stdout.splitlines()) if done.returncode == 0 else set()


def run_page(page: str, tmp_path: Path) -> dict[Block, str]:
    """Runs the page's blocks; returns what each printed on stdout (failures fail the test).

    The python process runs while the bash blocks run one after the other beside it."""
    printed = {}
    python = [b for b in runnable(page) if b.language == "python"]
    result_file = tmp_path / "results.json"
    process = None
    if python:
        process = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(result_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=environment(),
        )
        process.stdin.write(json.dumps([dataclasses.asdict(b) for b in python]))
        process.stdin.close()
    try:
        for block in runnable(page):
            if block.language != "python":
                printed[block] = run_bash(block)
        if process is not None:
            try:
                process.wait(timeout=PYTHON_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{page}: its python blocks ran past {PYTHON_TIMEOUT_S} s")
            stderr = process.stderr.read()
            assert process.returncode == 0 and result_file.exists(), stderr
            results = json.loads(result_file.read_text(encoding="utf-8"))
            for block, result in zip(python, results, strict=False):
                assert result["error"] is None, f"{block} failed:\n{result['error']}\n{stderr}"
                printed[block] = result["stdout"]
            assert len(results) == len(python)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if process is not None:
            process.stdout.close()
            process.stderr.close()
    return printed


def run_bash(block: Block) -> str:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        capture_output=True,
        text=True,
        timeout=BASH_TIMEOUT_S,
        cwd=ROOT,
        env=environment(),
        check=False,
    )
    assert done.returncode == 0, f"{block} failed ({done.returncode}):\n{done.stderr}"
    assert done.stdout.strip(), f"{block}: a command example that prints nothing"
    return done.stdout


def section_output(printed: dict[Block, str], heading: str, language: str) -> list[str]:
    outputs = [out for b, out in printed.items() if b.heading == heading and b.language == language]
    assert outputs, f"no {language} block ran under {heading!r}"
    return outputs


def lines(text: str) -> list[str]:
    return text.rstrip("\n").splitlines()


def readme(printed):
    translate = "Translate with a Hugging Face or OpenNMT-tf model"
    (python,) = section_output(printed, translate, "python")
    first, second = lines(python)
    assert first == second != ""  # the text path and the ids path give the same translation
    (cli,) = section_output(printed, translate, "bash")
    marian, opennmt_tf = lines(cli)
    assert marian == first  # the command line gives what Python gives
    assert opennmt_tf == "t12 t13 t7 t13 t18 t9"  # the fixture's task: map, then reverse

    continue_ = "Continue a prompt with a decoder-only model"
    (python,) = section_output(printed, continue_, "python")
    first, second = lines(python)
    assert first == second == " kato vi resu ne pe bo daru"  # the toy language's continuation
    (cli,) = section_output(printed, continue_, "bash")
    assert lines(cli) == ["lo toru kato vi resu ne pe bo daru"]  # the prompt, then what follows


def search(printed):
    (three_lines,) = section_output(printed, "Three lines to decode", "python")
    assert three_lines.strip(), "the example prints nothing"
    _sketch, toy = section_output(printed, "The step-function contract", "python")
    assert toy.strip()  # the toy model's hypotheses
    (trace,) = section_output(printed, "The trace", "python")
    assert "word_ids" in trace and "beam_indices" in trace


def serving(printed):
    (engine,) = section_output(printed, "The engine", "python")
    assert "new tokens:" in engine  # the sampled request streamed its tokens


def importing(printed):
    (onmt,) = section_output(printed, "OpenNMT-tf", "python")
    assert lines(onmt) == ["t12 t13 t7 t13 t18 t9"]  # as the command line of the README gives it


def models(printed):
    (example,) = printed.values()
    assert lines(example)[-1] == "93324544"  # `base`: 93.3M parameters, shapes only


def scaling(printed):
    (example,) = section_output(printed, "Scaling out", "python")
    assert lines(example)[-1] == "True"  # the mesh decodes the one-device ids


EXPECTED = {
    "README.md": readme,
    "docs/search.md": search,
    "docs/serving.md": serving,
    "docs/importing.md": importing,
    "docs/models.md": models,
    "docs/scaling.md": scaling,
}


@pytest.mark.parametrize("page", [page for page in PAGES if runnable(page)])
def test_the_code_blocks_run_as_written(page, tmp_path):
    before = repository_changes()
    printed = run_page(page, tmp_path)
    if page in EXPECTED:
        EXPECTED[page](printed)
    written = repository_changes() - before
    assert not written, f"{page}: its blocks wrote into the repository: {sorted(written)}"


def test_the_pages_are_those_of_the_readme_map():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"]({page})" in text, f"README.md's map of the documentation lacks {page}"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_lead_to_a_file_and_a_heading():
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, fragment = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            assert file.exists(), f"{page}: a link to {target}, which does not exist"
            if fragment and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(encoding="utf-8"), re.M)
                assert fragment in {anchor(h) for h in headings}, f"{page}: no heading {target}"


def test_the_readme_layout_names_every_module():
    """The README's Layout lists every sub-package and module of jaxformer/, so that it cannot
    drift from the package again."""
    (layout,) = [b.code for b in blocks("README.md") if b.heading == "Layout"]
    for path in sorted((ROOT / "jaxformer").rglob("*.py")):
        relative = path.relative_to(ROOT / "jaxformer")
        if relative.parent != Path("."):
            assert f"{relative.parts[0]}/" in layout, f"Layout lacks {relative.parts[0]}/"
        name = relative.stem
        if name == "__init__" and relative.parent != Path("."):
            continue
        if name == "__main__":
            continue
        assert re.search(rf"\b{re.escape(name)}\b", layout), f"Layout lacks {relative}"
