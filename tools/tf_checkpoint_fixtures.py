"""Write the TensorFlow checkpoints that tests/interop/test_tf_checkpoint.py reads without TensorFlow.

Run with TensorFlow in a throwaway virtual environment (the tests themselves need no TensorFlow):

    python3.11 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.13.1
    /tmp/tfvenv/bin/python tools/tf_checkpoint_fixtures.py  # from the repository root

It writes under tests/data/tf_checkpoint/:

* ``dtypes/``: a ``tf.train.CheckpointManager`` that saved ckpt-1 and ckpt-2 (one variable changed),
  with its ``checkpoint`` file; variables of many dtypes and shapes, strings among them.
* ``sharded/model``: two bundles written by ``SaveV2`` and merged by ``MergeV2Checkpoints`` (what a
  sharded save does), so the data lie in 2 files; one tensor is 1 MiB (its values repeat every 16 KiB,
  so git stores it compressed).
* ``sliced/model``: a variable saved as two slices (a partitioned variable).
* ``many/model``: 300 small tensors with long keys, so that the index spans several 4 KiB blocks.
* ``values.json``: per checkpoint, TensorFlow's own listing (``tf.train.list_variables`` and the
  reader's dtype map) and every tensor's dtype, shape, sha256 of its bytes and, when small, the bytes.
"""

import base64
import hashlib
import json
import pathlib
import shutil

import numpy as np
import tensorflow as tf

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "tf_checkpoint"


def numpy_values(rng):
    floats = rng.standard_normal(12).astype(np.float32)
    floats[:4] = [np.nan, np.inf, -0.0, 1e-40]  # NaN, infinity, negative zero, a subnormal
    return {
        "f32": floats.reshape(3, 4),
        "f64": rng.standard_normal((2, 3)),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i8": np.array([-128, -1, 0, 127], np.int8),
        "i16": np.array([[-32768, 7], [32767, 0]], np.int16),
        "i32": rng.integers(-(2**31), 2**31, (2, 2, 2), dtype=np.int32),
        "i64": np.array([-(2**63), 2**63 - 1, 3], np.int64),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "flag": np.array([True, False, True]),
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 3), np.float32),
    }


def write_dtypes(directory):
    rng = np.random.default_rng(0)
    variables = {name: tf.Variable(value) for name, value in numpy_values(rng).items()}
    variables["bf16"] = tf.Variable(tf.constant([1.0, -2.5, 3.140625, 1e30], tf.bfloat16))
    words = [b"", b"a", "héllo".encode(), b"x" * 200, b"\x00\xff"]  # 200: a 2-byte varint length
    variables["words"] = tf.Variable(tf.constant(np.array(words, object).reshape(5, 1)))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(**variables), directory, 2)
    manager.save()
    variables["f64"].assign(variables["f64"] * 2)
    manager.save()


def write_sharded(prefix):
    rng = np.random.default_rng(1)
    block = rng.standard_normal(4096).astype(np.float32)
    shards = [
        {"big": np.tile(block, 64).reshape(256, 1024), "step": np.int64(7)},
        {"layer/kernel": rng.standard_normal((3, 2)).astype(np.float32), "names": np.array([b"a"])},
    ]
    parts = [f"{prefix}_part{i}" for i in range(len(shards))]
    for part, tensors in zip(parts, shards, strict=True):
        names = list(tensors)
        tf.raw_ops.SaveV2(
            prefix=part,
            tensor_names=names,
            shape_and_slices=[""] * len(names),
            tensors=[tf.constant(tensors[n]) for n in names],
        )
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=str(prefix))


def write_sliced(prefix):
    full = np.arange(8, dtype=np.float32).reshape(4, 2)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=["w", "w", "b"],
        shape_and_slices=["4 2 0,2:-", "4 2 2,2:-", ""],
        tensors=[tf.constant(full[:2]), tf.constant(full[2:]), tf.constant([1.0, 2.0])],
    )


def write_many(prefix):
    names = [f"model/decoder/layers/{i}/self_attention/linear_{i % 7}/kernel" for i in range(300)]
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant([i, -i], tf.int16) for i in range(len(names))],
    )


def record(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes = reader.get_variable_to_dtype_map()
    tensors = {}
    for name in sorted(dtypes):
        try:
            value = reader.get_tensor(name)
        except Exception as error:  # the sliced variable: TF's reader assembles it
            tensors[name] = {"error": type(error).__name__}
            continue
        if dtypes[name] == tf.string:  # bytes for a scalar: not via numpy's "S" (drops b"\0")
            value = np.array(value, dtype=object)
            raw = [base64.b64encode(v).decode() for v in value.reshape(-1)]
            tensors[name] = {"dtype": "string", "shape": list(value.shape), "strings": raw}
            continue
        value = np.asarray(value)
        data = value.tobytes()
        entry = {"dtype": dtypes[name].name, "shape": list(value.shape)}
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        if len(data) <= 4096:
            entry["bytes"] = base64.b64encode(data).decode()
        tensors[name] = entry
    listing = [[name, list(shape)] for name, shape in tf.train.list_variables(str(prefix))]
    tf_dtypes = {name: dtype.name for name, dtype in sorted(dtypes.items())}
    return {"list_variables": listing, "dtypes": tf_dtypes, "tensors": tensors}


def one_per_line(value, depth, indent=" "):
    """JSON of nested dicts and lists: ``depth`` levels open, then one item a line."""
    if depth < 0 or not isinstance(value, dict | list):
        return json.dumps(value)
    items = value.items() if isinstance(value, dict) else [(None, v) for v in value]
    lines = [
        indent
        + " "
        + ("" if k is None else f"{json.dumps(k)}: ")
        + one_per_line(v, depth - 1, indent + " ")
        for k, v in items
    ]
    opening, closing = "{}" if isinstance(value, dict) else "[]"
    return f"{opening}\n" + ",\n".join(lines) + f"\n{indent}{closing}"


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    write_dtypes(OUT / "dtypes")
    write_sharded(OUT / "sharded" / "model")
    write_sliced(OUT / "sliced" / "model")
    write_many(OUT / "many" / "model")
    prefixes = ["dtypes/ckpt-1", "dtypes/ckpt-2", "sharded/model", "sliced/model", "many/model"]
    parts = [f" {json.dumps(p)}: {one_per_line(record(OUT / p), 1)}" for p in prefixes]
    head = f'{{"tensorflow_version": "{tf.__version__}", "checkpoints": {{\n'
    (OUT / "values.json").write_text(head + ",\n".join(parts) + "\n}}\n")


if __name__ == "__main__":
    main()
