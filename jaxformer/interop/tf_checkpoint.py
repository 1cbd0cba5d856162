"""Read TensorFlow checkpoints (the V2 "tensor bundle" format) with numpy only, no TensorFlow.

A checkpoint is a prefix, e.g. ``run/ckpt-5``: ``ckpt-5.index`` maps each variable name to where
its bytes lie in the data shards ``ckpt-5.data-0000K-of-0000N``. Sources of the format:

* ``tensorflow/core/util/tensor_bundle/tensor_bundle.proto``: ``BundleHeaderProto`` (the value of
  the empty key: num_shards=1, endianness=2, version=3) and ``BundleEntryProto`` (every other key:
  dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6 (fixed32), slices=7);
  ``tensorflow/core/framework/tensor_shape.proto``: ``TensorShapeProto`` (dim=2 {size=1},
  unknown_rank=3); ``tensorflow/core/framework/types.proto``: the ``DataType`` numbers.
* ``tensorflow/core/util/tensor_bundle/tensor_bundle.cc``: data files are the tensors' raw
  little-endian bytes; an entry's crc32c is ``Mask(crc32c(bytes))``; a DT_STRING tensor is the
  varint64 lengths of its elements, a 4-byte masked crc32c of those lengths (taken as uint32 each),
  then the bytes, and its entry crc covers the uint32 lengths, that 4-byte checksum and the bytes.
* LevelDB's ``doc/table_format.md`` (TensorFlow's copy is ``tensorflow/tsl/lib/io/table*``): the
  ``.index`` is an SSTable; a 48-byte footer holds the metaindex and index block handles (varint64
  offset, size) and the magic 0xdb4775248b80fb57; blocks hold prefix-compressed entries followed by
  restart points, and a 5-byte trailer (compression type, masked crc32c). TF writes them
  uncompressed.

``read_checkpoint`` verifies every block's and tensor's checksum (``verify=False`` skips the
tensors'); the crc32c runs on numpy over many chunks of the data at once (0.5-1 s per 100 MB on a
busy 2-core machine), small tensors grouped into one pass.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["latest_checkpoint", "list_variables", "read_checkpoint", "resolve_checkpoint"]

_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
# DataType number -> numpy dtype (types.proto); DT_STRING becomes an object array of bytes.
_DTYPES = {
    1: np.dtype(np.float32), 2: np.dtype(np.float64), 3: np.dtype(np.int32),
    4: np.dtype(np.uint8), 5: np.dtype(np.int16), 6: np.dtype(np.int8),
    7: np.dtype(object), 8: np.dtype(np.complex64), 9: np.dtype(np.int64),
    10: np.dtype(np.bool_), 14: np.dtype(ml_dtypes.bfloat16), 17: np.dtype(np.uint16),
    18: np.dtype(np.complex128), 19: np.dtype(np.float16), 22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
}  # fmt: skip
_UNSUPPORTED = {11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16", 20: "resource",
                21: "variant"}  # fmt: skip


def _make_tables() -> np.ndarray:
    """Slicing-by-4 tables: [0] is the byte-wise table, [k] a byte followed by k zero bytes."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    tables = [t]
    for _ in range(3):
        tables.append((tables[-1] >> 8) ^ t[tables[-1] & 0xFF])
    return np.stack(tables)


_TABLES = _make_tables()
_TABLE_LIST = [int(v) for v in _TABLES[0]]


def _apply(op: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A linear map of the 32-bit register given as 4 x 256 byte-sliced images, applied to x."""
    return op[0][x & 0xFF] ^ op[1][(x >> 8) & 0xFF] ^ op[2][(x >> 16) & 0xFF] ^ op[3][x >> 24]


@functools.cache
def _zeros_map(log2_bytes: int) -> np.ndarray:
    """The register map of 2**log2_bytes zero bytes, as byte-sliced images."""
    if log2_bytes > 0:
        return _apply(_zeros_map(log2_bytes - 1), _zeros_map(log2_bytes - 1))
    shifts = np.arange(256, dtype=np.uint32) << (8 * np.arange(4, dtype=np.uint32))[:, None]
    return _TABLES[0][shifts & 0xFF] ^ (shifts >> 8)


def _registers(rows: np.ndarray) -> np.ndarray:
    """Crc registers (from 0) of the rows of a [count, width] uint8 array, 4 bytes a step."""
    words = np.ascontiguousarray(rows.view("<u4").T)  # [step, row]
    reg, x = np.zeros(len(rows), dtype=np.uint32), np.empty(len(rows), dtype=np.uint32)
    for word in words:
        np.bitwise_xor(reg, word, out=x)
        reg = _TABLES[3][x & 0xFF] ^ _TABLES[2][(x >> 8) & 0xFF]
        reg ^= _TABLES[1][(x >> 16) & 0xFF] ^ _TABLES[0][x >> 24]
    return reg


def _crc32c(data: bytes | bytearray | memoryview) -> int:
    """Standard crc32c of ``data``: a byte loop when short, else numpy over many chunks at once.

    The register is linear: from initial value 0, leading zero bytes leave it 0, and the register
    of A+B is Z(reg(A)) ^ reg(B), Z the map of len(B) zero bytes. The initial value 0xFFFFFFFF
    equals flipping the first 4 bytes and starting from 0.
    """
    n = len(data)
    if n < 64:
        crc = 0xFFFFFFFF
        for b in bytes(data):
            crc = _TABLE_LIST[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    chunk = 1 << min(12, max(6, (n >> 14).bit_length()))  # 64..4096 bytes, about n / 16384
    k = -(-n // chunk)
    buf = np.zeros(k * chunk, dtype=np.uint8)  # zero padding in front: register unchanged
    buf[k * chunk - n :] = np.frombuffer(data, dtype=np.uint8)
    buf[k * chunk - n : k * chunk - n + 4] ^= 0xFF
    reg = _registers(buf.reshape(k, chunk))
    level = chunk.bit_length() - 1  # combine neighbours: Z of 2**level zero bytes, level + 1, ...
    while len(reg) > 1:
        if len(reg) % 2:
            reg = np.concatenate([np.zeros(1, dtype=np.uint32), reg])
        reg, level = _apply(_zeros_map(level), reg[0::2]) ^ reg[1::2], level + 1
    return int(reg[0]) ^ 0xFFFFFFFF


def _crc32c_many(buffers: list[bytes | bytearray]) -> list[int]:
    """crc32c of each buffer; those of 4..4096 bytes go in one numpy pass per padded width."""
    out, groups = [0] * len(buffers), {}
    for i, data in enumerate(buffers):
        if 4 <= len(data) <= 4096:
            groups.setdefault(max(64, 1 << (len(data) - 1).bit_length()), []).append(i)
        else:
            out[i] = _crc32c(data)
    for width, members in groups.items():
        rows = np.zeros((len(members), width), dtype=np.uint8)
        for row, i in zip(rows, members, strict=True):
            row[width - len(buffers[i]) :] = np.frombuffer(buffers[i], dtype=np.uint8)
            row[width - len(buffers[i]) :][:4] ^= 0xFF
        for i, reg in zip(members, _registers(rows).tolist(), strict=True):
            out[i] = reg ^ 0xFFFFFFFF
    return out


def _mask(crc: int) -> int:
    """LevelDB's and TF's masked crc (crc32c.h): rotate right by 15, add a constant."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("malformed varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """Decode one protobuf message: field number -> values (ints, or bytes for wire type 2)."""
    out: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(tag >> 3, []).append(value)
    if pos != len(buf):
        raise ValueError("truncated protobuf message")
    return out


def _block(data: bytes, handle: bytes, path: Path) -> bytes:
    """Contents of the block at ``handle`` (varint offset, size), its trailer checked."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + 5 > len(data):
        raise ValueError(f"{path}: block [{offset}, {offset + size + 5}) is past the end of file")
    contents, kind = data[offset : offset + size], data[offset + size]
    if kind != 0:
        raise ValueError(f"{path}: block compression type {kind}; only 0 (none) is supported")
    stored = int.from_bytes(data[offset + size + 1 : offset + size + 5], "little")
    if _mask(_crc32c(data[offset : offset + size + 1])) != stored:
        raise ValueError(f"{path}: checksum mismatch in the block at offset {offset}")
    return contents


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Key-value pairs of a block: shared, unshared, value lengths, key suffix, value."""
    restarts = int.from_bytes(block[-4:], "little")
    end, pos, key, out = len(block) - 4 - 4 * restarts, 0, b"", []
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        out.append((key, block[pos + unshared : pos + unshared + length]))
        pos += unshared + length
    return out


def _read_table(path: Path) -> list[tuple[bytes, bytes]]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint index {path} not found")
    data = path.read_bytes()
    magic = int.from_bytes(data[-8:], "little") if len(data) >= _FOOTER_SIZE else None
    if magic != _MAGIC:
        found = "a file too short" if magic is None else f"magic number {magic:#x}"
        raise ValueError(f"{path} is not a TF checkpoint index: {found}, expected {_MAGIC:#x}")
    footer = data[-_FOOTER_SIZE:]
    _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle (no filters)
    index = _block(data, footer[pos:], path)
    return [kv for _, h in _block_entries(index) for kv in _block_entries(_block(data, h, path))]


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int
    sliced: bool


def _parse_entry(value: bytes) -> _Entry:
    f = _fields(value)
    shape_fields = _fields(f[2][0]) if 2 in f else {}
    if shape_fields.get(3, [0])[0]:
        raise ValueError("tensor of unknown rank")
    shape = tuple(_fields(dim).get(1, [0])[0] for dim in shape_fields.get(2, []))
    get = lambda n: f.get(n, [0])[0]  # proto3 defaults are 0
    return _Entry(get(1), shape, get(3), get(4), get(5), get(6), 7 in f)


def _read_index(prefix: Path) -> tuple[int, dict[str, _Entry]]:
    """(num_shards, key -> entry) of ``prefix.index``; the keys of slices (b"\\0...") are left out."""
    path = Path(f"{prefix}.index")
    items = _read_table(path)
    if not items or items[0][0] != b"":
        raise ValueError(f"{path}: no BundleHeaderProto under the empty key")
    header = _fields(items[0][1])
    version = _fields(header[3][0]) if 3 in header else {}
    if header.get(2, [0])[0] != 0:
        raise NotImplementedError(f"{path}: big-endian checkpoints are not supported")
    if version.get(2, [0])[0] > 1:  # min_consumer; this reader knows version 1
        raise ValueError(f"{path}: needs a reader of bundle version {version[2][0]} or newer")
    entries = {k.decode(): _parse_entry(v) for k, v in items[1:] if not k.startswith(b"\0")}
    return header.get(1, [1])[0], entries


def _dtype_name(code: int) -> str:
    return _DTYPES[code].name if code in _DTYPES else _UNSUPPORTED.get(code, f"DataType {code}")


def _decode_strings(buf: bytearray, entry: _Entry) -> tuple[np.ndarray, bytes]:
    """The array of a DT_STRING tensor, and the bytes its entry's crc32c covers."""
    count, pos, lengths = int(np.prod(entry.shape)), 0, []
    for _ in range(count):
        n, pos = _varint(buf, pos)
        lengths.append(n)
    as_ints = b"".join(n.to_bytes(4 if n < 2**32 else 8, "little") for n in lengths)
    check = bytes(buf[pos : pos + 4])
    if int.from_bytes(check, "little") != _mask(_crc32c(as_ints)):
        raise ValueError("checksum mismatch in the string lengths")
    pos += 4
    if pos + sum(lengths) != len(buf):
        raise ValueError(f"string lengths sum to {sum(lengths)}, {len(buf) - pos} bytes stored")
    checked = as_ints + check + buf[pos:]
    out = np.empty(count, dtype=object)
    for i, n in enumerate(lengths):
        out[i], pos = bytes(buf[pos : pos + n]), pos + n
    return out.reshape(entry.shape), checked


def _read_bytes(key: str, entry: _Entry, path: Path) -> bytearray:
    if entry.dtype not in _DTYPES:
        raise NotImplementedError(f"{key}: dtype {_dtype_name(entry.dtype)} is not supported")
    dtype = _DTYPES[entry.dtype]
    expected = int(np.prod(entry.shape)) * dtype.itemsize
    if not dtype.hasobject and entry.size != expected:
        raise ValueError(f"{key}: entry says {entry.size} bytes, its shape needs {expected}")
    with path.open("rb") as f:
        f.seek(entry.offset)
        buf = bytearray(entry.size)
        got = f.readinto(buf)
    if got != entry.size:
        raise ValueError(
            f"{path} is truncated: {key} needs bytes [{entry.offset}, {entry.offset + entry.size})"
            f" but the file has {path.stat().st_size}"
        )
    return buf


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The prefix the ``checkpoint`` file names (model_checkpoint_path), if its .index exists;
    else the ``<name>-N.index`` in ``directory`` with the largest N; None when there is none."""
    directory = Path(directory)
    state = directory / "checkpoint"
    if state.is_file():
        found = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', state.read_text(), re.M)
        if found:
            named = Path(codecs.escape_decode(found[1].encode())[0].decode())
            for prefix in (directory / named, directory / named.name):  # absolute, then moved
                if Path(f"{prefix}.index").is_file():
                    return prefix
    numbered = []
    for index in directory.glob("*.index"):
        match = re.fullmatch(r"(.+)-(\d+)\.index", index.name)
        if match and index.is_file():
            numbered.append((int(match[2]), index.name, directory / index.name[:-6]))
    return max(numbered)[2] if numbered else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint prefix of a directory (its latest), a prefix, an .index or a data file."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(
                f"no TensorFlow checkpoint in directory {path}: looked for a 'checkpoint' file "
                "naming one and for <name>-<N>.index files"
            )
        return latest
    prefix = Path(re.sub(r"(\.index|\.data-\d{5}-of-\d{5})$", "", str(path)))
    if Path(f"{prefix}.index").is_file():
        return prefix
    raise FileNotFoundError(
        f"no TensorFlow checkpoint at {path}: looked for {prefix}.index (the path may be a "
        "checkpoint directory, a prefix such as run/ckpt-5, or its .index file)"
    )


def list_variables(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (numpy dtype name, shape), from the .index alone. Strings are ``object``;
    partitioned variables are listed whole (their slices' keys are not)."""
    _, entries = _read_index(resolve_checkpoint(path))
    return {key: (_dtype_name(e.dtype), e.shape) for key, e in entries.items()}


def read_checkpoint(
    path: str | Path, *, keys: Iterable[str] | None = None, verify: bool = True
) -> dict[str, np.ndarray]:
    """The tensors of a checkpoint (prefix, .index file, or directory: its latest), by key: all of
    them, or those named in ``keys`` (KeyError for a key the checkpoint lacks).

    String tensors (such as ``_CHECKPOINTABLE_OBJECT_GRAPH``) are object arrays of ``bytes``;
    bfloat16 is ``ml_dtypes.bfloat16``. ``verify`` checks every tensor's crc32c. Partitioned
    (sliced) variables raise NotImplementedError.
    """
    prefix = resolve_checkpoint(path)
    num_shards, entries = _read_index(prefix)
    if keys is not None:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [key for key in keys if key not in entries]
        if missing:
            raise KeyError(f"checkpoint {prefix} has no variable {', '.join(missing)}")
        entries = {key: entries[key] for key in keys}
    arrays, checked, files = {}, {}, {}
    for key, entry in entries.items():
        if entry.sliced:
            raise NotImplementedError(f"{key} is a partitioned (sliced) variable: not supported")
        if not 0 <= entry.shard < num_shards:
            raise ValueError(f"{key}: shard {entry.shard} of a {num_shards}-shard checkpoint")
        files[key] = Path(f"{prefix}.data-{entry.shard:05d}-of-{num_shards:05d}")
        if not files[key].is_file():
            raise FileNotFoundError(f"data shard {files[key]} not found (it holds {key})")
        buf = _read_bytes(key, entry, files[key])
        if _DTYPES[entry.dtype].hasobject:
            try:
                arrays[key], checked[key] = _decode_strings(buf, entry)
            except ValueError as e:
                raise ValueError(f"{files[key]}: {key}: {e}") from None
        else:
            arrays[key] = np.frombuffer(buf, dtype=_DTYPES[entry.dtype]).reshape(entry.shape)
            checked[key] = buf
    if verify:
        for key, crc in zip(checked, _crc32c_many(list(checked.values())), strict=True):
            if _mask(crc) != entries[key].crc:
                raise ValueError(f"{files[key]}: {key}: checksum mismatch")
    return arrays
