"""Tokenizers with one protocol and fixed special ids: bytes, characters and sentencepiece.

Every tokenizer maps text to a list of ids and back, and reserves the same four ids::

    PAD_ID = 0    padding (batches are padded with it; masks are ``ids != PAD_ID``)
    BOS_ID = 1    start of a target sequence (prepended by ``batching``)
    EOS_ID = 2    end of a target sequence (appended by ``batching``)
    UNK_ID = 3    a symbol the vocabulary lacks

``encode`` never adds BOS/EOS (the batching code does, so one rule holds for every tokenizer).
``decode`` drops PAD/BOS/EOS, writes UNK as ``UNK_TEXT`` (U+FFFD) and raises ``ValueError`` naming
the id and the vocabulary size for an id outside ``[0, vocab_size)``.

- ``ByteTokenizer``: UTF-8 bytes offset by the 4 specials (vocab 260); round-trips any text, needs
  no training. Decoding ids that are not valid UTF-8 (a model's output) replaces the bad bytes by
  U+FFFD.
- ``CharTokenizer``: one id per character seen in a training text (sorted, so the same text gives
  the same vocabulary). A character not in the vocabulary encodes to ``UNK_ID`` (documented loss:
  such text does not round-trip).
- ``SentencePieceTokenizer``: a unigram or BPE model trained in memory on the training split,
  deterministic (one thread, no sentence sampling), with the trainer configured so that the special
  ids above hold. The serialized model is the tokenizer's state and is saved with the run.

``out_of_vocabulary(tokenizer, text)`` lists the symbols of a text that its tokenizer maps to
``UNK_ID`` (always none for bytes), so callers can tell the user instead of translating ``<unk>``.

``save(directory)`` writes ``tokenizer.json`` (its kind and state) and, for sentencepiece,
``spm.model``; ``load_tokenizer(directory)`` reads any of them back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

from jaxformer.data.corpora import import_optional

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
NUM_SPECIALS = 4
SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID)  # dropped by decode
UNK_TEXT = "\ufffd"
Ids = Iterable[int] | np.ndarray  # a list of ints or an integer array (a row of a batch)
CONFIG_FILE = "tokenizer.json"
SPM_FILE = "spm.model"
# jaxformer is installed from a clone (it is not on PyPI): the extra is named from the repository root.
SPM_INSTALL = (
    "pip install -e '.[data]' (from the jaxformer repository root), or: pip install sentencepiece"
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the CLI need from a tokenizer."""

    pad_id: ClassVar[int]
    bos_id: ClassVar[int]
    eos_id: ClassVar[int]
    unk_id: ClassVar[int]

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Ids) -> str: ...

    def save(self, directory: str | Path) -> None: ...


class _Specials:
    """The special ids shared by every tokenizer (class attributes, not fields)."""

    pad_id: ClassVar[int] = PAD_ID
    bos_id: ClassVar[int] = BOS_ID
    eos_id: ClassVar[int] = EOS_ID
    unk_id: ClassVar[int] = UNK_ID


def check_ids(ids: Ids, vocab_size: int) -> list[int]:
    """Returns ``ids`` as a list of ints; raises ``ValueError`` naming the first id out of range."""
    out = [int(i) for i in ids]
    for position, i in enumerate(out):
        if not 0 <= i < vocab_size:
            raise ValueError(
                f"token id {i} at position {position} is out of range for vocab_size {vocab_size} "
                f"(valid ids: 0..{vocab_size - 1})"
            )
    return out


def _write_config(directory: str | Path, config: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n")
    return directory


def _read_config(directory: str | Path, kind: str) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer in {directory}: {path} does not exist")
    config = json.loads(path.read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{path} holds a {config.get('kind')!r} tokenizer, not {kind!r}")
    return config


@dataclasses.dataclass(frozen=True)
class ByteTokenizer(_Specials):
    """UTF-8 bytes, id = byte + 4. Round-trips any text."""

    kind: ClassVar[str] = "byte"

    @property
    def vocab_size(self) -> int:
        return 256 + NUM_SPECIALS

    def encode(self, text: str) -> list[int]:
        return [b + NUM_SPECIALS for b in text.encode("utf-8")]

    def decode(self, ids: Ids) -> str:
        out, data = [], bytearray()
        for i in check_ids(ids, self.vocab_size):
            if i >= NUM_SPECIALS:
                data.append(i - NUM_SPECIALS)
            elif i == UNK_ID:
                out.append(data.decode("utf-8", errors="replace") + UNK_TEXT)
                data = bytearray()
        return "".join(out) + data.decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in a decoded text (specials: none); stop strings read them."""
        return [b""] * NUM_SPECIALS + [bytes([b]) for b in range(256)]

    def save(self, directory: str | Path) -> None:
        _write_config(directory, {"kind": self.kind})

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        _read_config(directory, cls.kind)
        return cls()


@dataclasses.dataclass(frozen=True)
class CharTokenizer(_Specials):
    """One id per character of the training text; unknown characters encode to ``UNK_ID``."""

    chars: tuple[str, ...]  # id = NUM_SPECIALS + position

    kind: ClassVar[str] = "char"

    def __post_init__(self):
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer.chars must be distinct single characters")

    @classmethod
    def train(cls, texts: str | Iterable[str]) -> CharTokenizer:
        """The vocabulary of ``texts`` (one string or many), sorted by code point."""
        seen: set[str] = set()
        for text in [texts] if isinstance(texts, str) else texts:
            seen.update(text)
        return cls(tuple(sorted(seen)))

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {c: NUM_SPECIALS + i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIALS + len(self.chars)

    def encode(self, text: str) -> list[int]:
        index = self._index
        return [index.get(c, UNK_ID) for c in text]

    def decode(self, ids: Ids) -> str:
        return "".join(
            UNK_TEXT if i == UNK_ID else self.chars[i - NUM_SPECIALS]
            for i in check_ids(ids, self.vocab_size)
            if i not in SPECIAL_IDS
        )

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in a decoded text (specials: none; unknown: U+FFFD)."""
        specials = [b"", b"", b"", UNK_TEXT.encode("utf-8")]
        return specials + [c.encode("utf-8") for c in self.chars]

    def save(self, directory: str | Path) -> None:
        _write_config(directory, {"kind": self.kind, "chars": "".join(self.chars)})

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        return cls(tuple(_read_config(directory, cls.kind)["chars"]))


@dataclasses.dataclass(frozen=True)
class SentencePieceTokenizer(_Specials):
    """A sentencepiece model (unigram or BPE); its serialized proto is the whole state."""

    model_proto: bytes = dataclasses.field(repr=False)

    kind: ClassVar[str] = "sentencepiece"

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        model_type: Literal["unigram", "bpe"] = "unigram",
        directory: str | Path | None = None,
        character_coverage: float = 1.0,
    ) -> SentencePieceTokenizer:
        """Trains on ``texts`` (one sentence each, from memory) and saves to ``directory`` if given.

        Deterministic: one thread, every sentence used (no sampling or shuffling). ``vocab_size``
        counts the 4 special ids. ``hard_vocab_limit`` is off, so a corpus too small for
        ``vocab_size`` gives a smaller vocabulary rather than an error (``vocab_size`` tells).
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        spm = import_optional("sentencepiece", SPM_INSTALL)
        sentences = [t for t in texts if t.strip()]
        if not sentences:
            raise ValueError("SentencePieceTokenizer.train needs at least one non-empty text")
        import io

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            unk_surface=UNK_TEXT,
            character_coverage=character_coverage,
            hard_vocab_limit=False,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
        tokenizer = cls(model.getvalue())
        if directory is not None:
            tokenizer.save(directory)
        return tokenizer

    @functools.cached_property
    def _processor(self) -> Any:
        spm = import_optional("sentencepiece", SPM_INSTALL)
        processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
        found = (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id())
        if found != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"sentencepiece model has special ids (pad, bos, eos, unk) = {found}, expected "
                f"{(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}; train it with SentencePieceTokenizer.train"
            )
        return processor

    @property
    def vocab_size(self) -> int:
        return int(self._processor.get_piece_size())

    def pieces(self, text: str) -> list[str]:
        return list(self._processor.encode(text, out_type=str))

    def encode(self, text: str) -> list[int]:
        return list(self._processor.encode(text))

    def decode(self, ids: Ids) -> str:
        return self._processor.decode(check_ids(ids, self.vocab_size))

    def token_bytes(self) -> list[bytes]:
        """Each piece's bytes inside a decoded text: ``▁`` is a space, ``<0xNN>`` its byte."""
        return sentencepiece_bytes(self._processor)

    def save(self, directory: str | Path) -> None:
        directory = _write_config(directory, {"kind": self.kind, "model": SPM_FILE})
        (directory / SPM_FILE).write_bytes(self.model_proto)

    @classmethod
    def load(cls, directory: str | Path) -> SentencePieceTokenizer:
        path = Path(directory) / SPM_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no sentencepiece model in {directory}: {path} does not exist "
                "(train one with SentencePieceTokenizer.train(texts, vocab_size, directory=...))"
            )
        tokenizer = cls(path.read_bytes())
        tokenizer._processor  # noqa: B018  (fails now, not at first use, on a bad model)
        return tokenizer


def sentencepiece_bytes(processor) -> list[bytes]:
    """The bytes of each piece of a ``SentencePieceProcessor`` in the middle of a decoded text."""
    out = []
    for i in range(processor.get_piece_size()):
        if processor.is_control(i):
            out.append(b"")
        elif processor.is_unknown(i):
            out.append(UNK_TEXT.encode("utf-8"))
        elif processor.is_byte(i):
            out.append(bytes([int(processor.id_to_piece(i)[3:5], 16)]))  # <0xNN>
        else:
            out.append(processor.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


TOKENIZERS: dict[str, type[ByteTokenizer | CharTokenizer | SentencePieceTokenizer]] = {
    cls.kind: cls for cls in (ByteTokenizer, CharTokenizer, SentencePieceTokenizer)
}


def load_tokenizer(directory: str | Path) -> ByteTokenizer | CharTokenizer | SentencePieceTokenizer:
    """Loads whichever tokenizer ``save`` wrote to ``directory``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        if (Path(directory) / SPM_FILE).is_file():
            return SentencePieceTokenizer.load(directory)
        raise FileNotFoundError(f"no tokenizer in {directory}: {path} does not exist")
    kind = json.loads(path.read_text()).get("kind")
    if kind not in TOKENIZERS:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind].load(directory)


def out_of_vocabulary(tokenizer: Tokenizer, text: str) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` encodes as ``UNK_ID``, in order of appearance.

    Characters for ``CharTokenizer``, the unknown surface strings for ``SentencePieceTokenizer``,
    nothing for ``ByteTokenizer``. A tokenizer with an ``unknown(text)`` method (a loaded
    checkpoint's): what it says. Any other: one ``UNK_TEXT`` per ``UNK_ID`` it produces.
    """
    if hasattr(tokenizer, "unknown"):
        return list(tokenizer.unknown(text))
    if isinstance(tokenizer, ByteTokenizer):
        return []
    if isinstance(tokenizer, CharTokenizer):
        index = tokenizer._index
        return [c for c in text if c not in index]
    if isinstance(tokenizer, SentencePieceTokenizer):
        proto = tokenizer._processor.encode_as_proto(text)
        return [piece.surface for piece in proto.pieces if piece.id == UNK_ID]
    return [UNK_TEXT for i in tokenizer.encode(text) if i == UNK_ID]


def encode_all(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [tokenizer.encode(t) for t in texts]
