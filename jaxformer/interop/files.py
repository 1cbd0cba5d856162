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


# safetensors dtype codes (the format's spec) -> little-endian numpy dtypes; bfloat16 and the 8-bit
# floats come from ml_dtypes (safetensors' own numpy API cannot read them).
def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
        "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
        "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"),
        "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
        "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    }  # fmt: skip


class SafetensorsFile:
    """One ``*.safetensors`` file, read one tensor at a time (``read(name)``).

    The format: an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the tensors' bytes. Opening
    parses the header and checks every tensor's bytes lie inside the file, so a truncated or
    damaged file is refused by name before anything is read; ``read`` then seeks to one tensor
    and reads only its bytes (a model larger than the host memory can be converted tensor by
    tensor).
    """

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                length = int.from_bytes(head, "little")
                if length > size - 8:
                    raise ValueError(f"header of {length} bytes in a file of {size}")
                header = json.loads(f.read(length).decode("utf-8"))
            self.metadata = header.pop("__metadata__", None) or {}
            self.start = 8 + length
            self.entries = {
                name: self._entry(name, e, size - self.start) for name, e in header.items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
            raise CheckpointError(
                f"{path}: not a readable safetensors file (truncated or damaged: {detail})"
            ) from None

    @staticmethod
    def _entry(name: str, entry: dict, data_size: int) -> tuple[np.dtype, tuple[int, ...], int]:
        dtypes = _safetensors_dtypes()
        if entry["dtype"] not in dtypes:
            raise ValueError(
                f"tensor {name!r} has dtype {entry['dtype']}, which jaxformer does not read"
            )
        dtype, shape = dtypes[entry["dtype"]], tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"tensor {name!r} lies past the end of the file")
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        return dtype, shape, begin

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin = self.entries[name]
        count = int(np.prod(shape))
        with self.path.open("rb") as f:
            f.seek(self.start + begin)
            data = f.read(count * dtype.itemsize)
        return np.frombuffer(data, dtype, count).reshape(shape)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (a truncated or damaged file is refused by name)."""
    file = SafetensorsFile(path)
    return {name: file.read(name) for name in file.entries}


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
