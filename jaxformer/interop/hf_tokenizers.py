"""The tokenizers of Hugging Face model directories, with ``tokenizers`` and ``sentencepiece``.

- ``tokenizer.json`` (BART, T5, mT5, NLLB, and most recent models): the ``tokenizers`` library reads
  the whole pipeline; we frame the ids ourselves so that the source language can change per call:
  NLLB ``[src_lang] tokens </s>``, T5 ``tokens </s>``, BART ``<s> tokens </s>``.
- Marian (``source.spm``, ``target.spm``, ``vocab.json`` and, with separate vocabularies,
  ``target_vocab.json``): sentencepiece pieces looked up in the JSON vocabulary, then ``</s>``;
  ``>>lang<<`` tokens at the start of a source stay whole. Hugging Face's MarianTokenizer also runs
  Moses punctuation normalisation when ``sacremoses`` is installed; jaxformer does not.
- T5 with only ``spiece.model``: sentencepiece ids, then ``</s>``.

Every tokenizer has ``encode(text) -> ids``, ``decode(ids) -> text`` (special tokens dropped),
``vocab_size``, ``unk_id`` and ``unknown(text)`` (the pieces encoded as ``unk_id``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxformer.data.tokenizers import Ids
from jaxformer.interop.weights import CheckpointError

LANGUAGE_TOKEN = re.compile(r"(>>[^<>\s]+<<)")  # Marian's target-language tokens


@dataclasses.dataclass
class FastTokenizer:
    """A ``tokenizer.json`` pipeline with explicit framing: ``prefix + ids + suffix``."""

    tokenizer: Any  # tokenizers.Tokenizer
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    unk_id: int | None
    files: tuple[Path, ...]
    ids: dict[str, int]  # the checkpoint's start / end / pad ids

    bos_id = property(lambda self: self.ids["start"])  # jaxformer's Tokenizer protocol
    eos_id = property(lambda self: self.ids["end"])
    pad_id = property(lambda self: self.ids["pad"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no token {token!r}")
        return i

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [*self.prefix, *ids, *self.suffix]

    def decode(self, ids: Ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def unknown(self, text: str) -> list[str]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return [
            text[start:end]
            for i, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
            if i == self.unk_id
        ]

    def with_prefix(self, prefix: Sequence[int]) -> FastTokenizer:
        return dataclasses.replace(self, prefix=tuple(prefix))

    def for_language(self, language: str) -> FastTokenizer:
        """NLLB / M2M100 sources: ``[language] tokens </s>`` (``language``: a code such as
        ``eng_Latn``, one token of the vocabulary)."""
        if self.tokenizer.token_to_id(language) is None:
            raise ValueError(f"source language {language!r} is not a token of this tokenizer")
        return self.with_prefix([self.token_id(language)])

    def save(self, directory: str | Path) -> None:
        _copy(self.files, directory)


@dataclasses.dataclass
class MarianTokenizer:
    """Marian's sentencepiece model plus a JSON vocabulary (pieces -> ids)."""

    model: Any  # sentencepiece.SentencePieceProcessor
    vocab: dict[str, int]
    eos_id: int
    unk_id: int
    specials: frozenset[int]
    files: tuple[Path, ...]
    add_eos: bool = True
    pad_id: int | None = None
    bos_id: int | None = None  # the decoder's start id

    def __post_init__(self):
        self.pieces = {i: piece for piece, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _pieces(self, text: str) -> list[str]:
        out = []
        for part in LANGUAGE_TOKEN.split(text):
            if LANGUAGE_TOKEN.fullmatch(part):
                out.append(part)
            elif part.strip():
                out.extend(self.model.encode(part, out_type=str))
        return out

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab.get(piece, self.unk_id) for piece in self._pieces(text)]
        return [*ids, self.eos_id] if self.add_eos else ids

    def decode(self, ids: Ids) -> str:
        pieces = [self.pieces.get(int(i), "") for i in ids if int(i) not in self.specials]
        return self.model.decode_pieces(pieces)

    def unknown(self, text: str) -> list[str]:
        return [p for p in self._pieces(text) if p not in self.vocab]

    def save(self, directory: str | Path) -> None:
        _copy(self.files, directory)


def _copy(files: Sequence[Path], directory: str | Path) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, Path(directory) / path.name)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def load(directory: Path, config: dict, ids: dict[str, int]):
    """``(source_tokenizer, target_tokenizer)`` of a model directory, or ``(None, None)``."""
    model_type = config["model_type"]
    settings = _json(directory / "tokenizer_config.json")
    if model_type == "marian" and (directory / "source.spm").exists():
        return _marian(directory, settings, ids)
    if (directory / "tokenizer.json").exists():
        return _fast(directory, model_type, settings, ids)
    if (directory / "spiece.model").exists():
        import sentencepiece

        model = sentencepiece.SentencePieceProcessor(model_file=str(directory / "spiece.model"))
        vocab = {model.id_to_piece(i): i for i in range(model.get_piece_size())}
        files = (directory / "spiece.model",)
        tok = MarianTokenizer(
            model, vocab, ids["end"], model.unk_id(), _special_ids(ids), files,
            pad_id=ids["pad"], bos_id=ids["start"],
        )  # fmt: skip
        return tok, dataclasses.replace(tok, add_eos=False)
    return None, None


def _special_ids(ids: dict[str, int], *more: int | None) -> frozenset[int]:
    return frozenset(i for i in (ids["start"], ids["end"], ids["pad"], *more) if i is not None)


def _marian(directory: Path, settings: dict, ids: dict[str, int]):
    import sentencepiece

    vocab = _json(directory / "vocab.json")
    target_vocab = _json(directory / "target_vocab.json") or vocab
    if not vocab:
        raise CheckpointError(f"{directory}: a Marian tokenizer needs vocab.json")
    unk = vocab.get(settings.get("unk_token", "<unk>"), vocab.get("<unk>"))
    specials = _special_ids(ids, unk)
    made = []
    for spm, table, eos in (("source.spm", vocab, True), ("target.spm", target_vocab, False)):
        model = sentencepiece.SentencePieceProcessor(model_file=str(directory / spm))
        files = (directory / spm, directory / "vocab.json")
        made.append(
            MarianTokenizer(
                model,
                table,
                ids["end"],
                unk,
                specials,
                files,
                add_eos=eos,
                pad_id=ids["pad"],
                bos_id=ids["start"],
            )
        )
    return made[0], made[1]


def _fast(directory: Path, model_type: str, settings: dict, ids: dict[str, int]):
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    unk = vocab.get(settings.get("unk_token") or "<unk>")
    bos = vocab.get(settings.get("bos_token") or "<s>")
    files = tuple(
        p
        for p in sorted(directory.iterdir())
        if p.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    )
    end = (ids["end"],)
    source_prefix = (bos,) if model_type == "bart" and bos is not None else ()  # <s> tokens </s>
    source = FastTokenizer(tokenizer, source_prefix, end, unk, files, ids)
    target = FastTokenizer(tokenizer, (), (), unk, files, ids)
    if model_type == "m2m100" and settings.get("src_lang"):  # NLLB: [src_lang] tokens </s>
        source = source.with_prefix([source.token_id(settings["src_lang"])])
    return source, target
