"""The README's and the reference pages' promises that can rot: the README stays an entry point, and
the sections a user is sent to (conventions of sources, the step-function contract, export) exist
and say what they must. That every code block runs as written is tests/test_docs.py's."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def section(title: str, page: str = "README.md") -> str:
    """The text of the section of ``page`` headed ``title`` (any level), up to the next heading."""
    text = (ROOT / page).read_text(encoding="utf-8")
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert match, f"{page} has no section {title!r}"
    return match.group(1)


def test_the_readme_is_an_entry_point():
    """At most ~200 lines, and its first screen says how to run the main job, how to test and how
    to use one's own model."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    first_screen = "\n".join(lines[:50])
    for promise in ("make demo", "make test", "jaxformer translate --model", "minutes"):
        assert promise in first_screen, promise


def test_the_four_things_people_come_for_are_sections_of_the_readme():
    for title in (
        "Translate with a Hugging Face or OpenNMT-tf model",
        "Continue a prompt with a decoder-only model",
        "Serve a model",
        "Train the demo model",
        "What makes it different",
    ):
        assert section(title).strip(), title
    assert "docs/serving.md" in section("Serve a model")
    assert "load_pretrained" in section("Translate with a Hugging Face or OpenNMT-tf model")


def test_sources_conventions_are_documented():
    text = section("Three lines to decode", "docs/search.md")
    assert "right-padded" in text and "pad_id" in text
    assert "EOS" in text and "end_id" in text


def test_step_function_contract_is_in_the_reference():
    text = section("The step-function contract", "docs/search.md")
    assert "def step_fn(ids, step, state)" in text
    for promise in ("logits", "R = B * W", "tile", "reorder", "attention", "max_length"):
        assert promise in text, promise
    # It was only in a file users do not have.
    for page in (README, *DOCS):
        assert "shared/DESIGN.md" not in page.read_text(encoding="utf-8"), page


def test_export_is_documented_with_its_length_penalty():
    text = section("Export to CTranslate2", "docs/training.md")
    assert "jaxformer export ctranslate2" in text
    assert "ctranslate2.Translator" in text
    assert "((5 + length) / 6) ** alpha" in text and "length ** length_penalty" in text
    assert "length_penalty=0" in text


def test_install_hints_work_from_a_clone():
    """jaxformer is not on PyPI: ``pip install 'jaxformer[data]'`` cannot work; ``'.[data]'`` from
    the repository root does."""
    from jaxformer.data import tokenizers
    from jaxformer.interop import __doc__ as interop_doc

    files = [README, *DOCS, ROOT / "experiments" / "README.md"]
    files += sorted((ROOT / "jaxformer" / "cli").glob("*.py"))
    files.append(ROOT / "jaxformer" / "data" / "tokenizers.py")
    files.append(ROOT / "jaxformer" / "interop" / "__init__.py")
    files += [
        ROOT / "jaxformer" / "data" / "corpora.py",
        ROOT / "jaxformer" / "interop" / "ctranslate2.py",
    ]
    for path in files:
        assert "jaxformer[" not in path.read_text(encoding="utf-8"), path
    assert "pip install -e '.[data]'" in tokenizers.SPM_INSTALL
    assert "pip install -e '.[ctranslate2]'" in interop_doc
