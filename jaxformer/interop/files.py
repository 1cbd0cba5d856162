"""Reading a model directory's files, each damaged one refused in one line that names it.

A truncated ``model.safetensors`` or ``source.spm``, a ``config.json`` cut in the middle: the
libraries that read them raise their own exceptions (``SafetensorError``, sentencepiece's
``RuntimeError``, a ``JSONDecodeError`` without the file's name). Every importer reads through these
functions instead, which raise ``CheckpointError`` (a ``ValueError``: the command line prints it
as one ``jaxformer: error:`` line and exits 2) with the file's path and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxformer.interop.weights import CheckpointError


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read it ({error.strerror or error})") from None


def read_json(path: Path, missing: Any = ...) -> Any:
    """The JSON value in ``path``; ``missing`` (if given) when the file does not exist."""
    if missing is not ... and not path.exists():
        return missing
    data = _bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text (damaged?)") from None
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        cut = "; the file ends early: truncated?" if error.pos >= len(data.rstrip()) - 1 else ""
        raise CheckpointError(f"{path}: not valid JSON ({error.msg}: {where}{cut})") from None


def read_json_object(path: Path, missing: Any = ...) -> dict:
    """``read_json``, which must be a JSON object (``{...}``)."""
    value = read_json(path, missing)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (a truncated or damaged file is refused by name)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or damaged: {detail})"
        ) from None


def read_sentencepiece(path: Path):
    """A ``sentencepiece.SentencePieceProcessor`` of the model file ``path``."""
    import sentencepiece

    data = _bytes(path)
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, TypeError):
        raise CheckpointError(
            f"{path}: not a readable sentencepiece model (truncated or damaged: it does not parse)"
        ) from None
    if processor.get_piece_size() == 0:
        raise CheckpointError(f"{path}: a sentencepiece model without pieces (damaged?)")
    return processor


def read_tokenizer_json(path: Path):
    """A ``tokenizers.Tokenizer`` of ``tokenizer.json`` (a damaged file is refused by name)."""
    import tokenizers

    read_json_object(path)  # a truncated file: the JSON error, with its position
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises plain Exceptions
        message = str(error).strip().splitlines()[0] if str(error).strip() else "parse error"
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({message})") from None
