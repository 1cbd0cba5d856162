"""The README's promises that can rot: its decoding example runs as pasted, and the sections a new
user is sent to (conventions of sources, the step-function contract, export) exist and say what
they must."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The text of the README section headed ``title`` (any level), up to the next heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_three_lines_to_decode_runs_as_pasted_and_prints():
    (code,) = python_blocks(section("Three lines to decode"))
    # A fresh interpreter, as a user pasting it would have (no test fixtures, no imports given).
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example prints nothing"


def test_the_serving_engine_example_runs(capsys):
    (code,) = python_blocks(section("Serving engine"))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "new tokens:" in printed


def test_sources_conventions_are_documented():
    text = section("Three lines to decode")
    assert "right-padded" in text and "pad_id" in text
    assert "EOS" in text and "end_id" in text


def test_step_function_contract_is_in_the_readme():
    text = section("The step-function contract")
    assert "def step_fn(ids, step, state)" in text
    for promise in ("logits", "R = B * W", "tile", "reorder", "attention", "max_length"):
        assert promise in text, promise
    # It was only in a file users do not have.
    assert "shared/DESIGN.md" not in README.read_text(encoding="utf-8")


def test_export_is_documented_with_its_length_penalty():
    text = section("Export to CTranslate2")
    assert "jaxformer export ctranslate2" in text
    assert "ctranslate2.Translator" in text
    assert "((5 + length) / 6) ** alpha" in text and "length ** length_penalty" in text
    assert "length_penalty=0" in text


def test_install_hints_work_from_a_clone():
    """jaxformer is not on PyPI: ``pip install 'jaxformer[data]'`` cannot work; ``'.[data]'`` from
    the repository root does."""
    from jaxformer.data import tokenizers
    from jaxformer.interop import __doc__ as interop_doc

    root = README.parent
    files = [README, *sorted((root / "jaxformer" / "cli").glob("*.py"))]
    files.append(root / "jaxformer" / "data" / "tokenizers.py")
    files.append(root / "jaxformer" / "interop" / "__init__.py")
    files += [
        root / "jaxformer" / "data" / "corpora.py",
        root / "jaxformer" / "interop" / "ctranslate2.py",
    ]
    for path in files:
        assert "jaxformer[" not in path.read_text(encoding="utf-8"), path
    assert "pip install -e '.[data]'" in tokenizers.SPM_INSTALL
    assert "pip install -e '.[ctranslate2]'" in interop_doc


def test_your_model_in_jax_runs_as_pasted():
    """The loading example of "Your model in JAX" runs on the committed Marian fixture."""
    (code,) = python_blocks(section("Your model in JAX"))
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=README.parent,
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == second != ""  # the text path and the ids path give the same translation


def test_decoder_only_checkpoints_run_as_pasted():
    """The decoder-only example runs on the committed Llama 3 fixture: text and ids agree."""
    (code,) = python_blocks(section("Decoder-only checkpoints"))
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=README.parent,
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == second == " kato vi resu ne pe bo daru"  # the toy language's continuation
