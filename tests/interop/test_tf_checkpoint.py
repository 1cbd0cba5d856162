"""jaxformer.interop.tf_checkpoint reads TensorFlow checkpoints bit for bit, without TensorFlow.

Fixtures written by TensorFlow 2.13.1: tests/data/opennmt_tf/bundle_dtypes (tools/
opennmt_tf_checkpoints.py; 'hex' holds each tensor's bytes), the OpenNMT-tf models next to it
(their goldens.json lists each variable as TF does), and tests/data/tf_checkpoint
(tools/tf_checkpoint_fixtures.py: two saves of a CheckpointManager, a checkpoint merged from two
shards with a 1 MiB tensor, a partitioned variable, 300 tensors; 'bytes' or 'sha256' per tensor).
"""

import base64
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxformer.interop import tf_checkpoint
from jaxformer.interop.tf_checkpoint import (
    latest_checkpoint,
    list_variables,
    read_checkpoint,
    resolve_checkpoint,
)

DATA = Path(__file__).parents[1] / "data"
BUNDLE = DATA / "opennmt_tf" / "bundle_dtypes"
OWN = DATA / "tf_checkpoint"
OWN_VALUES = json.loads((OWN / "values.json").read_text())["checkpoints"]
MODELS = sorted(path.parent.name for path in (DATA / "opennmt_tf").glob("*/goldens.json"))


def numpy_name(tf_name):
    return "object" if tf_name == "string" else tf_name


def test_bundle_dtypes_bit_for_bit():
    golden = json.loads((BUNDLE / "values.json").read_text())
    tensors = read_checkpoint(BUNDLE / "ckpt-1")
    assert set(tensors) == {name for name, _ in golden["list_variables"]}
    assert tensors["_CHECKPOINTABLE_OBJECT_GRAPH"].shape == ()
    assert isinstance(tensors["_CHECKPOINTABLE_OBJECT_GRAPH"].item(), bytes)
    for key, want in golden["variables"].items():
        got = tensors[key]
        assert (got.dtype.name, list(got.shape)) == (numpy_name(want["dtype"]), want["shape"]), key
        if want["dtype"] == "string":
            assert [v.hex() for v in got.reshape(-1)] == want["hex"], key
        else:
            assert got.tobytes().hex() == want["hex"], key
    listing = {key: list(shape) for key, (_, shape) in list_variables(BUNDLE).items()}
    assert listing == {name: shape for name, shape in golden["list_variables"]}


@pytest.mark.parametrize("name", MODELS)
def test_opennmt_model_checkpoints(name):
    """OpenNMT-tf's own checkpoints (optimizer slots included): TF's listing and value samples."""
    directory = DATA / "opennmt_tf" / name
    golden = json.loads((directory / "goldens.json").read_text())
    want = {v["key"]: (numpy_name(v["dtype"]), tuple(v["shape"])) for v in golden["variables"]}
    assert list_variables(directory) == want
    tensors = read_checkpoint(directory)
    assert {key: (v.dtype.name, v.shape) for key, v in tensors.items()} == want
    for key, sample in golden["variable_samples"].items():
        assert tensors[key].reshape(-1)[:8].astype(np.float64).tolist() == sample, key


@pytest.mark.parametrize("prefix", sorted(OWN_VALUES))
def test_own_fixtures_bit_for_bit(prefix):
    golden = OWN_VALUES[prefix]
    listing = list_variables(OWN / prefix)
    assert [[key, list(shape)] for key, (_, shape) in listing.items()] == golden["list_variables"]
    assert {key: dtype for key, (dtype, _) in listing.items()} == {
        key: numpy_name(dtype) for key, dtype in golden["dtypes"].items()
    }
    if prefix.startswith("sliced"):
        with pytest.raises(NotImplementedError, match=r"^w is a partitioned"):
            read_checkpoint(OWN / prefix)
        b = read_checkpoint(OWN / prefix, keys=["b"])  # the other variables can still be read
        assert list(b) == ["b"] and b["b"].tolist() == [1.0, 2.0]
        return
    tensors = read_checkpoint(OWN / prefix)
    assert sorted(tensors) == sorted(golden["tensors"])
    for key, want in golden["tensors"].items():
        got = tensors[key]
        assert (got.dtype.name, list(got.shape)) == (numpy_name(want["dtype"]), want["shape"]), key
        if "strings" in want:
            assert [base64.b64encode(v).decode() for v in got.reshape(-1)] == want["strings"]
        else:
            assert hashlib.sha256(got.tobytes()).hexdigest() == want["sha256"], key
            if "bytes" in want:
                assert base64.b64encode(got.tobytes()).decode() == want["bytes"], key


def test_values_and_arrays():
    tensors = read_checkpoint(OWN / "dtypes")  # the directory: its latest, ckpt-2
    f32 = tensors["f32/.ATTRIBUTES/VARIABLE_VALUE"]
    assert np.isnan(f32[0, 0]) and f32[0, 1] == np.inf and np.signbit(f32[0, 2])
    assert tensors["bf16/.ATTRIBUTES/VARIABLE_VALUE"].astype(np.float32).tolist()[:3] == [
        1.0,
        -2.5,
        3.140625,
    ]
    words = tensors["words/.ATTRIBUTES/VARIABLE_VALUE"][:, 0].tolist()
    assert words == [b"", b"a", "héllo".encode(), b"x" * 200, b"\x00\xff"]
    assert int(tensors["save_counter/.ATTRIBUTES/VARIABLE_VALUE"]) == 2
    f64 = tensors["f64/.ATTRIBUTES/VARIABLE_VALUE"]
    f64[0, 0] = 0.0  # writable arrays, not views of a read-only buffer
    sharded = read_checkpoint(OWN / "sharded" / "model")
    big = sharded["big"]
    assert big.shape == (256, 1024) and big.nbytes == 2**20
    assert np.array_equal(big.reshape(64, 4096)[0], big.reshape(64, 4096)[63])  # tiled 64 times
    assert sharded["names"].tolist() == [b"a"] and int(sharded["step"]) == 7
    assert list(read_checkpoint(OWN / "sharded" / "model", keys=("step", "big"))) == ["step", "big"]
    with pytest.raises(KeyError, match="has no variable bias, kernel"):
        read_checkpoint(OWN / "sharded" / "model", keys=["bias", "step", "kernel"])
    assert "tensorflow" not in sys.modules


def test_latest_and_resolve(tmp_path):
    assert latest_checkpoint(OWN / "dtypes") == OWN / "dtypes" / "ckpt-2"
    assert latest_checkpoint(BUNDLE) == BUNDLE / "ckpt-1"
    assert latest_checkpoint(OWN / "sharded") is None  # no `checkpoint` file, no name-N.index
    assert latest_checkpoint(tmp_path) is None
    for n in (2, 9, 10):
        (tmp_path / f"ckpt-{n}.index").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-10"  # by number, not by name
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-9"
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/run/ckpt-2"\n')
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-2"  # an absolute path, moved here
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\n')
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-10"  # names a deleted checkpoint

    prefix = OWN / "sharded" / "model"
    for path in (prefix, f"{prefix}.index", f"{prefix}.data-00001-of-00002"):
        assert resolve_checkpoint(path) == prefix
    assert resolve_checkpoint(OWN / "dtypes") == OWN / "dtypes" / "ckpt-2"
    with pytest.raises(FileNotFoundError, match=r"looked for .*ckpt-7\.index"):
        resolve_checkpoint(OWN / "dtypes" / "ckpt-7")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint in directory"):
        read_checkpoint(tmp_path / "empty")


def copy_checkpoint(source, tmp_path):
    target = tmp_path / source.parent.name
    shutil.copytree(source.parent, target)
    return target / source.name


def test_corrupt_files(tmp_path):
    prefix = copy_checkpoint(OWN / "dtypes" / "ckpt-1", tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    index = Path(f"{prefix}.index")
    good_data, good_index = data.read_bytes(), index.read_bytes()

    data.write_bytes(good_data[:-10])
    with pytest.raises(
        ValueError, match=r"ckpt-1\.data-00000-of-00001 is truncated: .* needs bytes"
    ):
        read_checkpoint(prefix)
    words = tf_checkpoint._read_index(prefix)[1]["words/.ATTRIBUTES/VARIABLE_VALUE"]
    flipped = bytearray(good_data)
    flipped[words.offset + words.size - 1] ^= 1  # the last byte of the last string
    data.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"words/\.ATTRIBUTES/VARIABLE_VALUE: checksum mismatch"):
        read_checkpoint(prefix)
    assert read_checkpoint(prefix, verify=False)["words/.ATTRIBUTES/VARIABLE_VALUE"][4, 0] == (
        b"\x00\xfe"
    )
    data.unlink()
    with pytest.raises(FileNotFoundError, match=r"data shard .*ckpt-1\.data-00000-of-00001"):
        read_checkpoint(prefix)

    index.write_bytes(good_index[:-1] + b"\x00")
    with pytest.raises(ValueError, match=r"ckpt-1\.index is not a TF checkpoint index: magic"):
        list_variables(prefix)
    footer = good_index[-48:]  # metaindex handle, index handle: varint offset and size each
    _, pos = tf_checkpoint._varint(footer, tf_checkpoint._varint(footer, 0)[1])
    offset, pos = tf_checkpoint._varint(footer, pos)
    size, _ = tf_checkpoint._varint(footer, pos)
    for at, value, error in [(offset + size, 1, "compression type 1"), (offset, 0, "checksum")]:
        broken = bytearray(good_index)
        broken[at] = value if broken[at] != value else value + 1
        index.write_bytes(bytes(broken))
        with pytest.raises(ValueError, match=error):
            list_variables(prefix)


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def test_index_of_several_blocks(tmp_path):
    """TF starts a new block every 256 KiB of index: repack a real index into 3 data blocks."""
    source = OWN / "many" / "model"
    prefix = copy_checkpoint(source, tmp_path)
    items = tf_checkpoint._read_table(Path(f"{source}.index"))
    table = bytearray()

    def block(entries):  # keys unshared, one restart point; trailer: type 0 and its masked crc
        body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in entries)
        body += (0).to_bytes(4, "little") + (1).to_bytes(4, "little") + b"\0"
        handle = varint(len(table)) + varint(len(body) - 1)
        table.extend(body + tf_checkpoint._mask(tf_checkpoint._crc32c(body)).to_bytes(4, "little"))
        return handle

    index = [(part[-1][0], block(part)) for part in (items[:100], items[100:250], items[250:])]
    handles = block([]) + block(index)
    Path(f"{prefix}.index").write_bytes(
        bytes(table) + handles.ljust(40, b"\0") + (0xDB4775248B80FB57).to_bytes(8, "little")
    )
    got, want = read_checkpoint(prefix), read_checkpoint(source)
    assert list(got) == list(want) and len(got) == 300
    assert all(np.array_equal(got[key], want[key]) for key in want)


def test_missing_shard(tmp_path):
    prefix = copy_checkpoint(OWN / "sharded" / "model", tmp_path)
    Path(f"{prefix}.data-00001-of-00002").unlink()
    assert list_variables(prefix)["big"] == ("float32", (256, 1024))  # the index alone
    with pytest.raises(FileNotFoundError, match=r"model\.data-00001-of-00002 not found"):
        read_checkpoint(prefix)


def test_crc32c():
    def bytewise(data):
        crc = 0xFFFFFFFF
        for b in data:
            crc = tf_checkpoint._TABLE_LIST[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

    assert tf_checkpoint._crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    sizes = [0, 3, 4, 5, 63, 64, 65, 100, 4096, 4097, 3 * 4096 + 5, 2**16 + 1, 2**20 + 3]
    buffers = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    want = [bytewise(data) for data in buffers]
    assert [tf_checkpoint._crc32c(data) for data in buffers] == want
    assert tf_checkpoint._crc32c_many(buffers) == want  # grouped by padded width
