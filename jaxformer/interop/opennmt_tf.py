"""OpenNMT-tf V2 Transformer checkpoints as jaxformer models, read without TensorFlow.

    pre = load_pretrained("run/", source_vocabulary="src-vocab.txt",
                          target_vocabulary="tgt-vocab.txt", model="TransformerBase")

``path``: a training directory (its latest checkpoint, per the ``checkpoint`` file), a checkpoint
prefix (``run/ckpt-5000``, or ``run/avg/ckpt-5000`` from ``onmt-main average_checkpoints``) or its
``.index`` file. The tensor-bundle files are read by ``tf_checkpoint.py``.

What the checkpoint stores, and is read from it: the layers, ``num_units``, ``ffn_inner_dim``, the
vocabulary sizes, the relative position range, pre- or post-norm, shared embeddings and the output
bias. What it does not store comes as hints:

- ``model``: a catalog name (``TransformerBase``, ``TransformerBigRelative``, ... see
  ``OPENNMT_TF_PRESETS``), which fixes ``num_heads`` and whether sinusoids are on;
- or ``num_heads`` (needed unless the model has relative positions, whose tables give the head
  width) and ``positions`` (``"sinusoidal"`` or ``"none"``; needed with relative positions, since
  OpenNMT-tf keeps its sinusoids unless ``position_encoder_class=None``);
- ``activation`` (``ffn_activation``; relu by default), ``max_len``, ``dtype``;
- ``source_vocabulary`` / ``target_vocabulary``: OpenNMT-tf vocabulary files (one token per line,
  ids in order, ``<unk>`` appended as the last id), giving whitespace tokenizers.

The config and the variables' names are the family module's (``families/opennmt_tf.py``): the
model computes what OpenNMT-tf computes (``models.presets.OPENNMT_TF``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from jaxformer.data.tokenizers import Ids
from jaxformer.interop import tf_checkpoint
from jaxformer.interop.families import opennmt_tf as family
from jaxformer.interop.pretrained import Pretrained
from jaxformer.interop.weights import CheckpointError, Tensors, assemble, expected_shapes

HINTS = (
    "model",
    "num_heads",
    "positions",
    "activation",
    "source_vocabulary",
    "target_vocabulary",
    "max_len",
    "dtype",
)
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
PAD_ID, START_ID, END_ID = 0, 1, 2  # OpenNMT-tf's constants (<blank>, <s>, </s>)


def is_checkpoint(path: Path) -> bool:
    try:
        tf_checkpoint.resolve_checkpoint(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class VocabularyTokenizer:
    """Tokenized text in, tokenized text out: whitespace-separated tokens of an OpenNMT-tf
    vocabulary file. Ids are line numbers; a token outside the file is ``<unk>``, the last id."""

    tokens: tuple[str, ...]
    path: Path
    pad_id: ClassVar[int] = PAD_ID  # jaxformer's Tokenizer protocol
    bos_id: ClassVar[int] = START_ID
    eos_id: ClassVar[int] = END_ID

    @classmethod
    def load(cls, path: str | Path) -> VocabularyTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        try:
            lines = path.read_bytes().decode("utf-8").split("\n")
        except UnicodeDecodeError as error:
            raise CheckpointError(
                f"vocabulary file {path}: not UTF-8 text (byte {error.start}); damaged, or not "
                "an OpenNMT-tf vocabulary"
            ) from None
        if lines and lines[-1] == "":
            lines.pop()
        return cls(tuple(lines), path)

    @property
    def unk_id(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens) + 1

    @property
    def _index(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, token in enumerate(self.tokens):
            index.setdefault(token, i)  # OpenNMT-tf's lookup keeps the first of duplicates
        return index

    def encode(self, text: str) -> list[int]:
        index = self._index
        return [index.get(token, self.unk_id) for token in text.split()]

    def decode(self, ids: Ids) -> str:
        ids = [int(i) for i in ids]
        words = [self.tokens[i] if i < len(self.tokens) else "<unk>" for i in ids]
        return " ".join(w for i, w in zip(ids, words, strict=True) if i > END_ID)

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in a decoded text: its token after a space (the first word of a text
        has none); special ids none. Stop strings read them."""
        words = [b"" if i <= END_ID else f" {t}".encode() for i, t in enumerate(self.tokens)]
        return [*words, b" <unk>"]

    def unknown(self, text: str) -> list[str]:
        index = self._index
        return [token for token in text.split() if token not in index]

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / self.path.name).write_text("\n".join(self.tokens) + "\n")


def model_tensors(prefix: Path) -> Tensors:
    """The model's variables (optimizer slots and bookkeeping dropped), named without the
    ``model/`` prefix and the ``/.ATTRIBUTES/VARIABLE_VALUE`` suffix."""
    arrays = {}
    for key, array in tf_checkpoint.read_checkpoint(prefix).items():
        if key.startswith("model/") and key.endswith(SUFFIX) and "OPTIMIZER_SLOT" not in key:
            arrays[key[len("model/") : -len(SUFFIX)]] = array
    if not arrays:
        raise CheckpointError(f"{prefix}: no model variables (keys 'model/...') in the checkpoint")
    where = lambda name: f"{prefix}.index (key model/{name}{SUFFIX})"
    return Tensors.of_arrays(arrays, where, f"the OpenNMT-tf checkpoint {prefix}")


def load(path: str | Path, *, param_dtype: str = "float32", place=None, **hints) -> Pretrained:
    """An OpenNMT-tf checkpoint as a ``Pretrained`` (see the module docstring for the hints)."""
    prefix = tf_checkpoint.resolve_checkpoint(path)
    tensors = model_tensors(prefix)
    config = family.config(tensors, hints)
    model = family.MODEL(config)
    options = {} if place is None else {"place": place}
    params = assemble(
        family.table(config, tensors), tensors, expected_shapes(model), param_dtype=param_dtype,
        **options,
    )  # fmt: skip
    source, target = (
        _vocabulary(hints.get(name), size, name)
        for name, size in (
            ("source_vocabulary", config.source_vocab_size),
            ("target_vocabulary", config.vocab_size),
        )
    )
    return Pretrained(
        model=model,
        params=params,
        start_id=START_ID,
        end_id=END_ID,
        pad_id=PAD_ID,
        source_tokenizer=source,
        target_tokenizer=target,
        family="opennmt-tf",
        path=prefix,
    )


def _vocabulary(path, size: int, name: str) -> VocabularyTokenizer | None:
    if path is None:
        return None
    vocab = VocabularyTokenizer.load(path)
    if vocab.vocab_size != size:
        raise CheckpointError(
            f"{name} {path} has {len(vocab.tokens)} tokens, so {vocab.vocab_size} ids with the "
            f"<unk> OpenNMT-tf appends; the checkpoint's embedding has {size} rows"
        )
    if name == "source_vocabulary":
        return vocab
    specials = {PAD_ID: "<blank>", START_ID: "<s>", END_ID: "</s>"}
    for i, token in specials.items():
        if len(vocab.tokens) <= i or vocab.tokens[i] != token:
            raise CheckpointError(
                f"{name} {path}: line {i + 1} must be {token!r} (OpenNMT-tf's id {i}), got "
                f"{vocab.tokens[i] if i < len(vocab.tokens) else None!r}"
            )
    return vocab
