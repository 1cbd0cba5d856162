"""The tokenizers of Hugging Face model directories, with ``tokenizers`` and ``sentencepiece``.

- ``tokenizer.json`` (BART, T5, mT5, NLLB, and most recent models): the ``tokenizers`` library reads
  the whole pipeline; we frame the ids ourselves so that the source language can change per call:
  NLLB ``[src_lang] tokens </s>``, T5 ``tokens </s>``, BART ``<s> tokens </s>``.
- Marian (``source.spm``, ``target.spm``, ``vocab.json`` and, with separate vocabularies,
  ``target_vocab.json``): sentencepiece pieces looked up in the JSON vocabulary, then ``</s>``;
  ``>>lang<<`` tokens at the start of a source stay whole. Hugging Face's MarianTokenizer also runs
  Moses punctuation normalisation when ``sacremoses`` is installed; jaxformer does not.
- T5 with only ``spiece.model``: sentencepiece ids, then ``</s>``.
- Decoder-only LMs (``causal_lm``): ``tokenizer.json`` as it is, BOS first where the checkpoint
  adds one (``tokenizer_config.json``'s ``add_bos_token``, else what ``tokenizer.json``'s
  post-processor adds), and EOS last only where it says so (``add_eos_token``).

Every tokenizer has ``encode(text) -> ids``, ``decode(ids) -> text`` (special tokens dropped),
``vocab_size``, ``unk_id`` and ``unknown(text)`` (the pieces encoded as ``unk_id``).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxformer.data.tokenizers import Ids
from jaxformer.interop.files import read_json_object, read_sentencepiece, read_tokenizer_json
from jaxformer.interop.token_bytes import fast_tokenizer_bytes, piece_bytes
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
    ids: dict[str, Any]  # the checkpoint's start / end / pad ids (an LM's end: an int or a tuple)

    bos_id = property(lambda self: self.ids["start"])  # jaxformer's Tokenizer protocol
    pad_id = property(lambda self: self.ids["pad"])

    @property
    def eos_id(self) -> int:
        """EOS (the first, where a language model has several: ``Pretrained.end_id`` has all)."""
        end = self.ids["end"]
        return end[0] if isinstance(end, tuple) else end

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

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in a decoded text (``token_bytes.py``; stop strings read them)."""
        return fast_tokenizer_bytes(self.tokenizer)

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

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in a decoded text (special ids: none); stop strings read them."""
        return [
            b"" if i in self.specials else piece_bytes(self.pieces.get(i, ""))
            for i in range(self.vocab_size)
        ]

    def unknown(self, text: str) -> list[str]:
        return [p for p in self._pieces(text) if p not in self.vocab]

    def save(self, directory: str | Path) -> None:
        _copy(self.files, directory)


def _copy(files: Sequence[Path], directory: str | Path) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, Path(directory) / path.name)


def _json(path: Path) -> dict:
    return read_json_object(path, missing={})


def load(directory: Path, config: dict, ids: dict[str, int], rows: tuple[int, int]):
    """``(source_tokenizer, target_tokenizer)`` of a model directory, or ``(None, None)``.

    ``rows``: the source and target embeddings' rows. Every vocabulary is checked against the
    embedding it indexes (an id past its rows, or a Marian vocabulary of another size, is refused:
    a vocabulary cut short decodes to wrong text without an error otherwise) and, for Marian,
    against the sentencepiece pieces it looks up."""
    source, target = _load(directory, config, ids, rows)
    if source is not None:
        for tokenizer, count, side in ((source, rows[0], "source"), (target, rows[1], "target")):
            _check_rows(tokenizer, count, side, config["model_type"] == "marian")
    return source, target


def _check_rows(tokenizer, rows: int, side: str, exact: bool) -> None:
    """The tokenizer's ids fit the ``rows`` of the embedding they index (Marian: exactly)."""
    size = tokenizer.vocab_size
    if size > rows or (exact and size != rows):
        files = ", ".join(str(p) for p in tokenizer.files)
        raise CheckpointError(
            f"{files}: the {side} vocabulary has {size} tokens but the model's {side} embedding "
            f"has {rows} rows (config.json); the vocabulary does not belong to these weights, or "
            "is cut short"
        )


def _load(directory: Path, config: dict, ids: dict[str, int], rows: tuple[int, int]):
    model_type = config["model_type"]
    settings = _json(directory / "tokenizer_config.json")
    if model_type == "marian" and (directory / "source.spm").exists():
        return _marian(directory, settings, ids, rows)
    if (directory / "tokenizer.json").exists():
        return _fast(directory, model_type, settings, ids)
    if (directory / "spiece.model").exists():
        model = read_sentencepiece(directory / "spiece.model")
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


def _marian(directory: Path, settings: dict, ids: dict[str, int], rows: tuple[int, int]):
    vocab = _json(directory / "vocab.json")
    target_name = (
        "target_vocab.json" if (directory / "target_vocab.json").exists() else "vocab.json"
    )
    target_vocab = _json(directory / target_name)
    if not vocab:
        raise CheckpointError(f"{directory}: a Marian tokenizer needs vocab.json")
    for name, table, count in (
        ("vocab.json", vocab, rows[0]),
        (target_name, target_vocab, rows[1]),
    ):
        if len(table) != count:  # before the pieces: a cut vocabulary lacks many
            raise CheckpointError(
                f"{directory / name}: {len(table)} tokens, but the model's embedding has {count} "
                "rows (config.json); the vocabulary does not belong to these weights, or is cut "
                "short"
            )
        values = list(table.values())
        if not all(isinstance(i, int) for i in values) or sorted(values) != list(range(len(table))):
            raise CheckpointError(
                f"{directory / name}: ids must be 0 .. {len(table) - 1}, each once (damaged?)"
            )
    unk = vocab.get(settings.get("unk_token", "<unk>"), vocab.get("<unk>"))
    specials = _special_ids(ids, unk)
    made = []
    sides = (
        ("source.spm", "vocab.json", vocab, True),
        ("target.spm", target_name, target_vocab, False),
    )
    for spm, name, table, eos in sides:
        model = read_sentencepiece(directory / spm)
        files = (directory / spm, directory / "vocab.json")
        _check_pieces(model, table, (directory / spm, directory / name))
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


def _check_pieces(model, vocab: dict[str, int], files) -> None:
    """Every ordinary sentencepiece piece has an id in the JSON vocabulary: a piece without one
    would be read as ``<unk>`` (control and unknown pieces are framed by the loader instead)."""
    missing = [
        model.id_to_piece(i)
        for i in range(model.get_piece_size())
        if not (model.is_control(i) or model.is_unknown(i)) and model.id_to_piece(i) not in vocab
    ]
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
        warnings.warn(
            f"{files[1]}: {len(missing)} of {model.get_piece_size()} pieces of {files[0].name} "
            f"have no id ({shown}); they are read as <unk>",
            UserWarning,
            stacklevel=4,
        )


def _fast(directory: Path, model_type: str, settings: dict, ids: dict[str, int]):
    tokenizer = read_tokenizer_json(directory / "tokenizer.json")
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


def causal_lm(directory: Path, ids: dict, rows: int) -> FastTokenizer | None:
    """A decoder-only LM's ``tokenizer.json`` (None without one), framed as the checkpoint says:
    BOS first if ``tokenizer_config.json``'s ``add_bos_token`` is true, EOS last if its
    ``add_eos_token`` is; where it says nothing, as ``tokenizer.json``'s post-processor frames a
    text (Llama 3's ``TemplateProcessing`` puts ``<|begin_of_text|>`` first). ``rows``: the
    embedding's rows, which every id must fit."""
    path = directory / "tokenizer.json"
    if not path.exists():
        return None
    settings = _json(directory / "tokenizer_config.json")
    tokenizer = read_tokenizer_json(path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    prefix, suffix = _post_processor_framing(tokenizer)
    bos = vocab.get(_content(settings.get("bos_token")), ids["start"])
    eos = vocab.get(_content(settings.get("eos_token")), ids["end"])
    if isinstance(eos, tuple):
        eos = eos[0]
    if settings.get("add_bos_token") is not None:
        prefix = (bos,) if settings["add_bos_token"] and bos is not None else ()
    if settings.get("add_eos_token") is not None:
        suffix = (eos,) if settings["add_eos_token"] else ()
    unk = vocab.get(_content(settings.get("unk_token")))
    ends = ids["end"] if isinstance(ids["end"], tuple) else (ids["end"],)
    if unk in (
        ids["start"],
        ids["pad"],
        *ends,
    ):  # GPT-2's unk is its EOS: byte-level, never unknown
        unk = None
    files = tuple(
        p
        for p in sorted(directory.iterdir())
        if p.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    )
    made = FastTokenizer(tokenizer, prefix, suffix, unk, files, ids)
    _check_rows(made, rows, "target", exact=False)
    return made


def _content(token) -> str | None:
    """A special token of tokenizer_config.json: a string, or an ``AddedToken`` as a dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _post_processor_framing(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids ``tokenizer.json``'s post-processor puts before and after a text."""
    plain = tokenizer.encode("a b", add_special_tokens=False).ids
    framed = tokenizer.encode("a b", add_special_tokens=True).ids
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return tuple(framed[:start]), tuple(framed[start + len(plain) :])
    return (), ()
