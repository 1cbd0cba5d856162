"""Train small OpenNMT-tf 2.32.0 Transformers and record their checkpoints and outputs.

Run by hand in a throwaway venv (see tools/README.opennmt_tf.md), never by CI: it needs TensorFlow
and OpenNMT-tf. It writes ``tests/data/opennmt_tf/<name>/`` for each fixture:

* ``bundle_dtypes``: a plain ``tf.train.Checkpoint`` of a few ``tf.Variable`` of every dtype the
  tensor-bundle reader should handle, plus ``values.json`` with their exact contents.
* ``article``, ``sinusoid_prenorm``, ``postnorm_shared``, ``relative_sinusoid``: a Transformer
  trained by OpenNMT-tf's own ``Runner.train`` for 2000 steps on a toy task (the target is a fixed
  token mapping of the source: as is, reversed, or sorted), its last checkpoint (``article``: the
  training checkpoint as Runner.train wrote it, optimizer slots included; the others: the same
  weights saved model-only by ``opennmt.utils.checkpoint.Checkpoint`` without an optimizer, to keep
  the fixture small), its vocabularies (``onmt-build-vocab``), a ``model.json`` with the
  constructor arguments, and ``goldens.json`` + ``arrays.npz`` with the model's own encoder
  outputs, teacher-forced logits and decoding results.
* ``averaged``: ``opennmt.utils.checkpoint.average_checkpoints`` of the last 3 training
  checkpoints of ``sinusoid_prenorm``.

Usage: ``/tmp/tfvenv/bin/python tools/opennmt_tf_checkpoints.py [--only NAME ...]``.
The training runs live in a scratch directory (``--work``, default /tmp/opennmt_tf_work), which is
wiped per model; only the last checkpoint is copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import numpy as np
import opennmt
import tensorflow as tf
import tensorflow_addons as tfa
from opennmt.utils import checkpoint as checkpoint_util
from opennmt.utils import misc

REPO = Path(__file__).resolve().parents[1]
OUT_ROOT = REPO / "tests" / "data" / "opennmt_tf"
DEFAULT_WORK = Path("/tmp/opennmt_tf_work")
MASTER_SEED = 20251201
VENV_BIN = Path(sys.executable).parent
N_TRAIN = 3000
N_SOURCES = 24
N_TRAIN_SOURCES = 6  # of the N_SOURCES test sources, how many are copied from the training set
N_FORWARD = 8  # batch for encoder_output / teacher-forced logits
OOV_TOKEN = "zzz"  # appears in one test source, never in training

# OpenNMT-tf inference parameters per decoding case (model.params entries).
# maximum_decoding_length 32 instead of OpenNMT-tf's default 250 keeps the arrays small (a
# hypothesis that never emits </s> runs to the limit).
DECODE_CASES = [
    ("greedy", {"beam_width": 1, "maximum_decoding_length": 32}),
    (
        "beam2_lp02_cp02",
        {
            "beam_width": 2,
            "length_penalty": 0.2,
            "coverage_penalty": 0.2,
            "maximum_decoding_length": 32,
        },
    ),
    ("beam4_lp06", {"beam_width": 4, "length_penalty": 0.6, "maximum_decoding_length": 32}),
    (
        "greedy_min5_max8",
        {"beam_width": 1, "minimum_decoding_length": 5, "maximum_decoding_length": 8},
    ),
]

# ------------------------------------------------------------------------------------------ tasks
# src_tokens/tgt_tokens: the token sets; mapping: source token index -> target token index;
# reverse: whether the target is the mapped source read backwards; shared: one vocabulary file.


def _perm(n, seed):
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def _task(src_prefix, n_src, tgt_prefix, n_tgt, seed, order, shared=False):
    src = [f"{src_prefix}{i}" for i in range(n_src)]
    if shared:
        tgt = src
        mapping = _perm(n_src, seed)
    else:
        tgt = [f"{tgt_prefix}{i}" for i in range(n_tgt)]
        perm = _perm(n_tgt, seed)
        mapping = [perm[i % n_tgt] for i in range(n_src)]
    return {
        "src_tokens": src,
        "tgt_tokens": tgt,
        "mapping": mapping,
        "order": order,
        "shared": shared,
        "min_len": 3,
        "max_len": 12,
    }


NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "ffn_dropout": 0.0}

MODELS = {
    # The OpenNMT-tf inference article's model (dropout 0 for training only: it is a no-op at
    # inference; without absolute positions the task is a sorted set, not a copy).
    "article": {
        "kwargs": {
            "num_layers": 1,
            "num_units": 6,
            "num_heads": 2,
            "ffn_inner_dim": 12,
            "maximum_relative_position": 8,
            "position_encoder_class": None,
            **NO_DROPOUT,
        },
        "task": _task("", 22, "", 22, 11, order="sorted_unique"),
        "steps": 2000,
        "learning_rate": 0.005,
    },
    "sinusoid_prenorm": {
        "model_only": True,
        "kwargs": {
            "num_layers": 2,
            "num_units": 32,
            "num_heads": 4,
            "ffn_inner_dim": 64,
            **NO_DROPOUT,
        },
        "task": _task("s", 30, "t", 20, 12, order="reversed"),
        "steps": 2000,
        "learning_rate": 0.003,
    },
    "postnorm_shared": {
        "model_only": True,
        "kwargs": {
            "num_layers": 2,
            "num_units": 32,
            "num_heads": 4,
            "ffn_inner_dim": 64,
            "pre_norm": False,
            "share_embeddings": "ALL",
            **NO_DROPOUT,
        },
        "task": _task("x", 30, None, None, 13, order="reversed", shared=True),
        "steps": 2000,
        "learning_rate": 0.0015,  # 0.003 left a loss spike at the last step
    },
    "relative_sinusoid": {
        "model_only": True,
        "kwargs": {
            "num_layers": [2, 1],
            "num_units": 32,
            "num_heads": 8,
            "ffn_inner_dim": 64,
            "maximum_relative_position": 8,
            "pre_norm": False,
            **NO_DROPOUT,
        },
        "task": _task("s", 26, "t", 26, 14, order="as_is"),
        "steps": 2000,
        "learning_rate": 0.003,
    },
}
# article: letters instead of numbered tokens (a..v -> A..V).
MODELS["article"]["task"]["src_tokens"] = [chr(ord("a") + i) for i in range(22)]
MODELS["article"]["task"]["tgt_tokens"] = [chr(ord("A") + i) for i in range(22)]
AVERAGED_FROM = "sinusoid_prenorm"
AVERAGE_COUNT = 3
ALL_NAMES = [
    "bundle_dtypes",
    "article",
    "sinusoid_prenorm",
    "postnorm_shared",
    "relative_sinusoid",
    "averaged",
]


def versions():
    return {
        "opennmt_tf_version": opennmt.__version__,
        "tensorflow_version": tf.__version__,
        "tensorflow_addons_version": tfa.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }


def _compact(value):
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def write_json(path, data):
    """One top-level key per line; lists of dicts and dicts one entry per line; rest compact."""
    lines = ["{"]
    items = list(data.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            body = ",\n".join("    " + _compact(v) for v in value)
            lines.append(f"  {json.dumps(key)}: [\n{body}\n  ]{comma}")
        elif isinstance(value, dict) and value:
            body = ",\n".join(f"    {json.dumps(k)}: {_compact(v)}" for k, v in value.items())
            lines.append(f"  {json.dumps(key)}: {{\n{body}\n  }}{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {_compact(value)}{comma}")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def write_checkpoint_state(directory, prefixes):
    """The ``checkpoint`` file, as tf.train.Checkpoint.save writes it (without timestamps)."""
    lines = [f'model_checkpoint_path: "{prefixes[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{p}"' for p in prefixes]
    (directory / "checkpoint").write_text("\n".join(lines) + "\n")


def copy_checkpoint(src_prefix, dst_dir):
    name = Path(src_prefix).name
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copyfile(src_prefix + suffix, dst_dir / (name + suffix))
    return name


def variables_listing(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes = reader.get_variable_to_dtype_map()
    return [
        {"key": k, "dtype": dtypes[k].name, "shape": list(s)}
        for k, s in tf.train.list_variables(str(prefix))
    ]


# ---------------------------------------------------------------------------------- bundle_dtypes


def _hex(arr):
    return np.ascontiguousarray(arr).tobytes().hex()


def bundle_dtypes(out):
    rng = np.random.default_rng(MASTER_SEED)
    f32 = np.array(
        [
            [0.0, -0.0, 1.0, -2.5, 3.4028235e38, 1e-40],
            [np.pi, -np.e, 1.1754944e-38, 0.1, -7.0, 65504.0],
        ],
        np.float32,
    )
    values = {
        "f32": tf.constant(f32),
        "f16": tf.constant(np.array([0.0, 1.0, -2.5, 65504.0, 6.1e-5, 0.333], np.float16)),
        "bf16": tf.constant(
            [[1.0, -2.25, 0.1, 3.0e38], [7.5, -0.0, 1e-3, 256.0]], dtype=tf.bfloat16
        ),
        "f64": tf.constant(np.array([np.pi, -1e300, 5e-324, 0.1], np.float64)),
        "i32": tf.constant(np.array([0, 1, -1, 2**31 - 1, -(2**31), 123456], np.int32)),
        "i64": tf.constant(np.array([[0, -1, 2**62 + 3], [-(2**63), 2**63 - 1, 7]], np.int64)),
        "bool": tf.constant(np.array([[True, False, True], [False, False, True]])),
        "scalar_f32": tf.constant(np.float32(-3.75)),
        "cube_f32": tf.constant(rng.standard_normal((2, 3, 4)).astype(np.float32)),
        "empty_f32": tf.constant(np.zeros((0, 3), np.float32)),
        "str": tf.constant([b"hello", b"", b"\xff\x00 not utf-8", ("long " * 40).encode()]),
        "scalar_str": tf.constant(b"a scalar string"),
    }
    variables = {k: tf.Variable(v, name=k) for k, v in values.items()}
    nested = tf.Module()
    nested.inner = tf.Variable(np.arange(5, dtype=np.float32), name="inner")
    nested.items = [tf.Variable(np.int32(42)), tf.Variable(np.array([1.5], np.float32))]
    ckpt = tf.train.Checkpoint(nested=nested, **variables)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    prefix = ckpt.write(str(out / "ckpt-1"))
    write_checkpoint_state(out, ["ckpt-1"])
    reader = tf.train.load_checkpoint(prefix)
    entries = {}
    for key, _ in tf.train.list_variables(prefix):
        if key == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        value = reader.get_tensor(key)
        dtype = reader.get_variable_to_dtype_map()[key]
        entry = {"dtype": dtype.name, "shape": list(np.shape(value))}
        if dtype == tf.string:
            flat = np.asarray(value, dtype=object).reshape(-1)
            entry["hex"] = [bytes(b).hex() for b in flat]
            entry["utf8"] = []
            for b in flat:
                try:
                    entry["utf8"].append(bytes(b).decode("utf-8"))
                except UnicodeDecodeError:
                    entry["utf8"].append(None)
        else:
            arr = np.asarray(value)
            if dtype == tf.bfloat16:
                bits = tf.bitcast(tf.constant(value, tf.bfloat16), tf.uint16).numpy()
                entry["hex"] = _hex(bits.astype("<u2"))
                entry["values"] = arr.astype(np.float32).tolist()
            else:
                entry["hex"] = _hex(arr.astype(arr.dtype.newbyteorder("<")))
                entry["values"] = arr.tolist()
        entries[key] = entry
    data = {
        **versions(),
        "description": (
            "tf.train.Checkpoint.write of the variables below (no save_counter); keys are "
            "'<attribute>/.ATTRIBUTES/VARIABLE_VALUE', nested ones 'nested/inner/...', "
            "'nested/items/0/...'. 'hex' is the raw little-endian content (bfloat16 as its "
            "uint16 bits; strings one hex entry per element, row-major); 'values' the same "
            "numbers as JSON (float32/16/bfloat16 widened exactly to float64); 'utf8' null "
            "for strings that are not UTF-8."
        ),
        "list_variables": [[k, list(s)] for k, s in tf.train.list_variables(prefix)],
        "variables": entries,
    }
    write_json(out / "values.json", data)
    print(f"bundle_dtypes: {len(entries)} variables -> {out}")


# ------------------------------------------------------------------------------------------ data


def make_pair(task, rng, length=None):
    n = len(task["src_tokens"])
    if length is None:
        length = int(rng.integers(task["min_len"], task["max_len"] + 1))
    idx = [int(i) for i in rng.integers(0, n, size=length)]
    src = [task["src_tokens"][i] for i in idx]
    mapped = [task["mapping"][i] for i in idx]
    if task["order"] == "reversed":
        mapped = mapped[::-1]
    elif task["order"] == "sorted_unique":
        mapped = sorted(set(mapped))
    tgt = [task["tgt_tokens"][j] for j in mapped]
    return " ".join(src), " ".join(tgt)


def make_data(task, seed):
    rng = np.random.default_rng(seed)
    train = [make_pair(task, rng) for _ in range(N_TRAIN)]
    seen = {s for s, _ in train}
    # Every token must appear in training so that the vocabulary has the intended size.
    assert {t for s, _ in train for t in s.split()} == set(task["src_tokens"])
    tests = list(train[:N_TRAIN_SOURCES])
    lengths = [2, 12, 5, 7, 3, 9, 4, 11, 6, 8, 10, 3, 5, 7, 9, 4, 6, 8]
    for length in lengths:
        while True:
            pair = make_pair(task, rng, length)
            if pair[0] not in seen:
                break
        tests.append(pair)
    # One source with an out-of-vocabulary token (its target is not defined: reference None).
    oov_src = tests[-1][0].split()
    oov_src.insert(2, OOV_TOKEN)
    tests.append((" ".join(oov_src), None))
    tests = [*tests[: N_SOURCES - 1], tests[-1]]
    # Interleave so that the forward batch (first N_FORWARD) mixes seen/unseen and lengths.
    order = [0, 6, 1, 7, 2, 8, 3, 9] + [
        i for i in range(N_SOURCES) if i not in (0, 6, 1, 7, 2, 8, 3, 9)
    ]
    tests = [tests[i] for i in order]
    return train, tests, seen


def build_vocab(files, out_path):
    cmd = [str(VENV_BIN / "onmt-build-vocab"), "--save_vocab", str(out_path)] + [
        str(f) for f in files
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out_path.read_text().splitlines()


# ----------------------------------------------------------------------------------------- model


def make_model(kwargs):
    kw = dict(kwargs)
    if "share_embeddings" in kw:
        kw["share_embeddings"] = getattr(
            opennmt.models.EmbeddingsSharingLevel, kw["share_embeddings"]
        )
    if isinstance(kw.get("num_layers"), list):
        kw["num_layers"] = tuple(kw["num_layers"])
    return opennmt.models.Transformer(**kw)


def data_config(directory, spec):
    if spec["task"]["shared"]:
        return {
            "source_vocabulary": str(directory / "vocab.txt"),
            "target_vocabulary": str(directory / "vocab.txt"),
        }
    return {
        "source_vocabulary": str(directory / "src_vocab.txt"),
        "target_vocabulary": str(directory / "tgt_vocab.txt"),
    }


def fresh_session(seed):
    """Resets Keras' layer-name counters and the seeds. The checkpoint's object graph records each
    variable's Keras name (e.g. transformer/self_attention_encoder/...), so without the reset the
    bytes would depend on how many models the process built before."""
    tf.keras.backend.clear_session()
    seed_everything(seed)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (TensorFlow and Keras read the global NumPy seed)
    tf.random.set_seed(seed)


def train_model(name, spec, work, out):
    """Runner.train in work/run; returns the training summary and the checkpoint prefixes."""
    task = spec["task"]
    seed = MASTER_SEED + ALL_NAMES.index(name)
    train, tests, seen = make_data(task, seed)
    work.mkdir(parents=True)
    (work / "train.src").write_text("".join(s + "\n" for s, _ in train))
    (work / "train.tgt").write_text("".join(t + "\n" for _, t in train))
    if task["shared"]:
        build_vocab([work / "train.src", work / "train.tgt"], out / "vocab.txt")
    else:
        build_vocab([work / "train.src"], out / "src_vocab.txt")
        build_vocab([work / "train.tgt"], out / "tgt_vocab.txt")
    config = {
        "model_dir": str(work / "run"),
        "data": {
            "train_features_file": str(work / "train.src"),
            "train_labels_file": str(work / "train.tgt"),
            **data_config(out, spec),
        },
        "params": {
            "optimizer": "Adam",
            "optimizer_params": {"beta_1": 0.9, "beta_2": 0.998},
            "learning_rate": spec["learning_rate"],
            "decay_type": "InvSqrtDecay",
            "decay_params": {"warmup_steps": 50},
            "label_smoothing": 0.0,
            "average_loss_in_time": False,
        },
        "train": {
            "batch_type": "examples",
            "batch_size": 64,
            "max_step": spec["steps"],
            "save_checkpoints_steps": 100,
            "keep_checkpoint_max": 5,
            "save_summary_steps": 100,
            "sample_buffer_size": -1,
            "average_last_checkpoints": 0,
            "length_bucket_width": 1,
        },
    }
    fresh_session(seed)
    runner = opennmt.Runner(make_model(spec["kwargs"]), config, auto_config=False, seed=seed)
    t0 = time.time()
    _, summary = runner.train(return_summary=True)
    elapsed = time.time() - t0
    print(
        f"{name}: trained {spec['steps']} steps in {elapsed:.1f} s, "
        f"last loss {float(summary['last_loss']):.4f}"
    )
    state = tf.train.get_checkpoint_state(str(work / "run"))
    prefixes = list(state.all_model_checkpoint_paths)
    info = {
        "seed": seed,
        "train_examples": len(train),
        "optimizer": config["params"],
        "train_config": config["train"],
        "last_step": int(summary["last_step"]),
        "last_loss": float(summary["last_loss"]),
        "last_learning_rate": float(summary["last_learning_rate"]),
        "checkpoints_written": [Path(p).name for p in prefixes],
    }
    return info, prefixes, tests, seen, runner


# ------------------------------------------------------------------------------------- inference


def load_model(spec, directory, prefix, params=None):
    fresh_session(MASTER_SEED)  # create_variables runs one training-mode call (dropout)
    model = make_model(spec["kwargs"])
    model.initialize(data_config(directory, spec), params=params or {})
    model.create_variables()
    status = tf.train.Checkpoint(model=model).restore(str(prefix))
    status.expect_partial()
    status.assert_existing_objects_matched()
    reader = tf.train.load_checkpoint(str(prefix))
    # The mapping also lists aliases (examples_inputter/inputters/0 = features_inputter, ...);
    # the checkpoint stores each variable once, under its first path.
    aliases = misc.get_variables_name_mapping(model, "model")
    ckpt_model_keys = {
        k
        for k, _ in tf.train.list_variables(str(prefix))
        if k.startswith("model/") and ".OPTIMIZER_SLOT" not in k
    }
    assert ckpt_model_keys <= set(aliases), ckpt_model_keys - set(aliases)
    mapping = {k: aliases[k] for k in sorted(ckpt_model_keys)}
    for key, var in mapping.items():
        np.testing.assert_array_equal(var.numpy(), reader.get_tensor(key))
    assert {id(v) for v in model.variables} == {id(v) for v in mapping.values()}
    return model, mapping


def tokens_batch(lines):
    toks = [line.split() for line in lines]
    width = max(len(t) for t in toks)
    padded = [t + ["<blank>"] * (width - len(t)) for t in toks]  # what make_features pads with
    return {"tokens": tf.constant(padded), "length": tf.constant([len(t) for t in toks], tf.int32)}


def vocab_lookup(vocab_lines):
    """token -> id as OpenNMT-tf's lookup tables give it (<unk> = last id)."""
    table = {t: i for i, t in enumerate(vocab_lines)}
    return table, len(vocab_lines)


def forward(model, src_lines, tgt_lines):
    feats = model.features_inputter.make_features(features=tokens_batch(src_lines))
    src_inputs = model.features_inputter(feats, training=False)
    enc_out, enc_state, enc_len = model.encoder(
        src_inputs, sequence_length=feats["length"], training=False
    )
    labels = model.labels_inputter.make_features(features=tokens_batch(tgt_lines))
    outputs = model._decode_target(labels, enc_out, enc_state, enc_len, training=False)
    return feats, enc_out, labels, outputs


def decode(model, src_lines, params):
    for key in (
        "beam_width",
        "length_penalty",
        "coverage_penalty",
        "maximum_decoding_length",
        "minimum_decoding_length",
        "num_hypotheses",
    ):
        model.params.pop(key, None)
    model.params.update(params)
    model.params["num_hypotheses"] = params.get("beam_width", 1)
    fn = model.serve_function()
    preds = fn(tokens_batch(src_lines))
    return {k: v.numpy() for k, v in preds.items()}


def tokens_to_ids(tokens, table, unk_id):
    flat = [
        table.get(t.decode("utf-8"), unk_id) if t.decode("utf-8") != "<unk>" else unk_id
        for t in tokens.reshape(-1)
    ]
    return np.array(flat, np.int32).reshape(tokens.shape)


def greedy_margins(model, src_lines, ids, lengths, end_id=2):
    """Teacher-force the greedy outputs; smallest top1-top2 logit gap over decided steps."""
    feats = model.features_inputter.make_features(features=tokens_batch(src_lines))
    src_inputs = model.features_inputter(feats, training=False)
    enc_out, enc_state, enc_len = model.encoder(
        src_inputs, sequence_length=feats["length"], training=False
    )
    b, _, t = ids.shape
    tgt_in = np.zeros((b, t), np.int32)
    tgt_in[:, 0] = 1
    tgt_in[:, 1:] = ids[:, 0, :-1]
    steps = np.minimum(lengths[:, 0] + 1, t)  # tokens decided, EOS included when emitted
    labels = {"ids": tf.constant(tgt_in), "length": tf.constant(steps.astype(np.int32))}
    outputs = model._decode_target(labels, enc_out, enc_state, enc_len, training=False)
    logits = outputs["logits"].numpy()
    gaps = []
    for i in range(b):
        for s in range(int(steps[i])):
            top = np.sort(logits[i, s])[::-1]
            gaps.append(float(top[0] - top[1]))
    return min(gaps), float(np.median(gaps))


# ------------------------------------------------------------------------ numpy re-derivation
# An independent float64 NumPy forward pass from the checkpoint tensors, written from the
# conventions read in OpenNMT-tf's source; collect_goldens asserts it matches OpenNMT-tf's
# encoder_output and logits, so the conventions listed in README.opennmt_tf.md are checked.

LN_EPS = 1e-3  # opennmt.layers.LayerNorm = tf.keras.layers.LayerNormalization (epsilon 0.001)


class _Weights:
    def __init__(self, prefix):
        self.reader = tf.train.load_checkpoint(str(prefix))

    def __call__(self, key):
        return self.reader.get_tensor(f"model/{key}/.ATTRIBUTES/VARIABLE_VALUE").astype(np.float64)


def np_layer_norm(w, key, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * w(key + "/gamma") + w(key + "/beta")


def np_sinusoids(length, depth):
    positions = np.arange(1, length + 1, dtype=np.float64)  # positions start at 1
    inv = np.exp(np.arange(depth // 2) * -(np.log(10000.0) / (depth / 2 - 1)))
    scaled = positions[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1)  # [sin..., cos...]


def np_dense(w, key, x):
    return x @ w(key + "/kernel") + w(key + "/bias")


def np_attention(w, key, x, memory, mask, heads, max_rel):
    """mask: bool [B, Tq, Tk]."""

    def split(t):
        b, n, d = t.shape
        return t.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)

    src = x if memory is None else memory
    q = split(np_dense(w, key + "/linear_queries", x))
    k = split(np_dense(w, key + "/linear_keys", src))
    v = split(np_dense(w, key + "/linear_values", src))
    q = q * (q.shape[-1] ** -0.5)
    dot = q @ k.transpose(0, 1, 3, 2)
    if max_rel is not None:
        tq, tk = q.shape[2], k.shape[2]
        rel = np.clip(np.arange(tk)[None, :] - np.arange(tq)[:, None], -max_rel, max_rel) + max_rel
        rel_k = w(key + "/relative_position_keys")[rel]  # [Tq, Tk, d]
        dot = dot + np.einsum("bhqd,qkd->bhqk", q, rel_k)
    dot = np.where(mask[:, None], dot, np.finfo(np.float32).min)
    dot = dot - dot.max(-1, keepdims=True)
    attn = np.exp(dot)
    attn = attn / attn.sum(-1, keepdims=True)
    out = attn @ v
    if max_rel is not None:
        out = out + np.einsum("bhqk,qkd->bhqd", attn, w(key + "/relative_position_values")[rel])
    b, h, t, d = out.shape
    return np_dense(w, key + "/linear_output", out.transpose(0, 2, 1, 3).reshape(b, t, h * d))


def np_sublayer(w, key, x, fn, pre_norm):
    if pre_norm:
        return x + fn(np_layer_norm(w, key + "/input_layer_norm", x))
    return np_layer_norm(w, key + "/output_layer_norm", x + fn(x))


def np_ffn(w, key, x):
    return np_dense(w, key + "/layer/outer", np.maximum(np_dense(w, key + "/layer/inner", x), 0))


def np_stack(w, part, x, lengths, kw, memory=None, mem_lengths=None):
    units, heads = kw["num_units"], kw["num_heads"]
    pre_norm, max_rel = kw.get("pre_norm", True), kw.get("maximum_relative_position")
    layers = kw["num_layers"]
    n = layers if isinstance(layers, int) else layers[0 if part == "encoder" else 1]
    x = x * units**0.5
    if kw.get("position_encoder_class", "default") is not None:
        x = x + np_sinusoids(x.shape[1], units)[None]
    t = x.shape[1]
    key_mask = np.arange(t)[None, :] < lengths[:, None]  # [B, T]
    self_mask = np.repeat(key_mask[:, None, :], t, axis=1)
    if part == "decoder":
        self_mask = self_mask & np.tril(np.ones((t, t), bool))[None]
        mem_mask = np.repeat(
            (np.arange(memory.shape[1])[None, :] < mem_lengths[:, None])[:, None, :], t, axis=1
        )
    for i in range(n):
        base = f"{part}/layers/{i}"
        x = np_sublayer(
            w,
            f"{base}/self_attention",
            x,
            lambda y, b=base: np_attention(
                w, f"{b}/self_attention/layer", y, None, self_mask, heads, max_rel
            ),
            pre_norm,
        )
        if part == "decoder":
            x = np_sublayer(
                w,
                f"{base}/attention/0",
                x,
                lambda y, b=base: np_attention(
                    w, f"{b}/attention/0/layer", y, memory, mem_mask, heads, None
                ),
                pre_norm,
            )
        x = np_sublayer(w, f"{base}/ffn", x, lambda y, b=base: np_ffn(w, f"{b}/ffn", y), pre_norm)
    if pre_norm:
        x = np_layer_norm(w, f"{part}/layer_norm", x)
    return x


def numpy_reference(spec, prefix, arrays, n):
    kw = spec["kwargs"]
    w = _Weights(prefix)
    shared = kw.get("share_embeddings") == "ALL"
    src_emb = w("examples_inputter/features_inputter/embedding")
    tgt_emb = src_emb if shared else w("examples_inputter/labels_inputter/embedding")
    src_ids, src_len = arrays["src_ids"][:n], arrays["src_lengths"][:n]
    s = int(src_len.max())
    enc = np_stack(w, "encoder", src_emb[src_ids[:, :s]], src_len, kw)
    dec = np_stack(
        w,
        "decoder",
        tgt_emb[arrays["tgt_in_ids"]],
        arrays["tgt_lengths"],
        kw,
        memory=enc,
        mem_lengths=src_len,
    )
    kernel = tgt_emb.T if shared else w("decoder/output_layer/kernel")
    logits = dec @ kernel + w("decoder/output_layer/bias")
    return {
        "encoder_output_max_abs_diff": float(np.abs(enc - arrays["encoder_output"]).max()),
        "logits_max_abs_diff": float(np.abs(logits - arrays["logits"]).max()),
    }


def collect_goldens(name, spec, directory, prefix, tests, seen, extra):
    model, mapping = load_model(spec, directory, prefix)
    src_vocab = Path(model.features_inputter.vocabulary_file).read_text().splitlines()
    tgt_vocab = Path(model.labels_inputter.vocabulary_file).read_text().splitlines()
    src_table, src_unk = vocab_lookup(src_vocab)
    tgt_table, tgt_unk = vocab_lookup(tgt_vocab)
    assert model.features_inputter.vocabulary_size == len(src_vocab) + 1
    assert model.labels_inputter.vocabulary_size == len(tgt_vocab) + 1
    src_lines = [s for s, _ in tests]
    arrays = {}

    # Source ids as the model's inputter gives them.
    feats = model.features_inputter.make_features(features=tokens_batch(src_lines))
    src_ids = feats["ids"].numpy().astype(np.int32)
    src_len = feats["length"].numpy().astype(np.int32)
    for i, line in enumerate(src_lines):
        expect = [src_table.get(t, src_unk) for t in line.split()]
        assert src_ids[i, : src_len[i]].tolist() == expect
        assert (src_ids[i, src_len[i] :] == 0).all()
    arrays["src_ids"] = src_ids
    arrays["src_lengths"] = src_len

    # Encoder output and teacher-forced logits on the first N_FORWARD sources.
    fwd_src = src_lines[:N_FORWARD]
    fwd_tgt = [t for _, t in tests[:N_FORWARD]]
    assert all(t is not None for t in fwd_tgt)
    _feats8, enc_out, labels, outputs = forward(model, fwd_src, fwd_tgt)
    arrays["encoder_output"] = enc_out.numpy().astype(np.float32)
    arrays["tgt_in_ids"] = labels["ids"].numpy().astype(np.int32)
    arrays["tgt_out_ids"] = labels["ids_out"].numpy().astype(np.int32)
    arrays["tgt_lengths"] = labels["length"].numpy().astype(np.int32)
    arrays["logits"] = outputs["logits"].numpy().astype(np.float32)
    if outputs.get("attention") is not None:
        arrays["forward_attention"] = outputs["attention"].numpy().astype(np.float32)

    numpy_check = numpy_reference(spec, prefix, arrays, N_FORWARD)
    assert numpy_check["encoder_output_max_abs_diff"] < 1e-4, numpy_check
    assert numpy_check["logits_max_abs_diff"] < 1e-3, numpy_check

    # Decoding cases with the model's own serving function.
    cases = []
    for case_name, params in DECODE_CASES:
        preds = decode(model, src_lines, params)
        ids = tokens_to_ids(preds["tokens"], tgt_table, tgt_unk)
        arrays[f"{case_name}/ids"] = ids
        arrays[f"{case_name}/lengths"] = preds["length"].astype(np.int32)
        arrays[f"{case_name}/log_probs"] = preds["log_probs"].astype(np.float32)
        if "alignment" in preds:
            arrays[f"{case_name}/alignment"] = preds["alignment"].astype(np.float32)
        tokens = [
            [[t.decode("utf-8") for t in hyp[: preds["length"][b, w]]] for w, hyp in enumerate(row)]
            for b, row in enumerate(preds["tokens"])
        ]
        case = {
            "name": case_name,
            "params": dict(params, num_hypotheses=params.get("beam_width", 1)),
            "effective": {
                "beam_width": params.get("beam_width", 1),
                "length_penalty": params.get("length_penalty", 0),
                "coverage_penalty": params.get("coverage_penalty", 0),
                "maximum_decoding_length": params.get("maximum_decoding_length", 250),
                "minimum_decoding_length": params.get("minimum_decoding_length", 0),
                "sampling_topk": 1,
            },
            "ids": ids.tolist(),
            "lengths": preds["length"].tolist(),
            "log_probs": preds["log_probs"].astype(np.float64).tolist(),
            "tokens": tokens,
            "exact_match_with_reference": sum(
                ref is not None and " ".join(tokens[b][0]) == ref
                for b, (_, ref) in enumerate(tests)
            ),
        }
        if case_name == "greedy":
            case["min_top1_top2_logit_gap"], case["median_top1_top2_logit_gap"] = greedy_margins(
                model, src_lines, ids, preds["length"]
            )
        cases.append(case)

    listing = variables_listing(prefix)
    reader = tf.train.load_checkpoint(str(prefix))
    for entry in listing:
        var = mapping.get(entry["key"])
        entry["keras_name"] = var.name if var is not None else None
    sample_keys = [k for k in extra["sample_keys"] if k in {e["key"] for e in listing}]
    samples = {
        k: np.asarray(reader.get_tensor(k)).reshape(-1)[:8].astype(np.float64).tolist()
        for k in sample_keys
    }

    goldens = {
        **versions(),
        "name": name,
        "checkpoint": Path(prefix).name,
        "model": extra["model_json"],
        "source_vocabulary": Path(model.features_inputter.vocabulary_file).name,
        "target_vocabulary": Path(model.labels_inputter.vocabulary_file).name,
        "source_vocabulary_size": model.features_inputter.vocabulary_size,
        "target_vocabulary_size": model.labels_inputter.vocabulary_size,
        "special_ids": {
            "<blank>": 0,
            "<s>": 1,
            "</s>": 2,
            "<unk>_source": src_unk,
            "<unk>_target": tgt_unk,
            "padding": 0,
        },
        "training": extra.get("training"),
        "sources": [
            {
                "text": s,
                "reference": t,
                "seen_in_training": s in seen,
                "ids": src_ids[i, : src_len[i]].tolist(),
            }
            for i, (s, t) in enumerate(tests)
        ],
        "src_ids": src_ids.tolist(),
        "src_lengths": src_len.tolist(),
        "forward": {
            "batch": N_FORWARD,
            "targets": fwd_tgt,
            "tgt_in_ids": arrays["tgt_in_ids"].tolist(),
            "tgt_out_ids": arrays["tgt_out_ids"].tolist(),
            "tgt_lengths": arrays["tgt_lengths"].tolist(),
            "encoder_output_shape": list(arrays["encoder_output"].shape),
            "logits_shape": list(arrays["logits"].shape),
            "logits_argmax": arrays["logits"].argmax(-1).tolist(),
        },
        "numpy_reference_check": numpy_check,
        "decoding": cases,
        "variables": listing,
        "variable_samples": samples,
        "notes": NOTES,
    }
    goldens.update(extra.get("goldens_extra", {}))
    write_json(directory / "goldens.json", goldens)
    np.savez_compressed(directory / "arrays.npz", **arrays)
    greedy = cases[0]
    print(
        f"{name}: greedy exact {greedy['exact_match_with_reference']}/{N_SOURCES - 1}, "
        f"min gap {greedy['min_top1_top2_logit_gap']:.3f}; "
        + ", ".join(f"{c['name']} exact {c['exact_match_with_reference']}" for c in cases[1:])
    )


NOTES = (
    "src_ids: features_inputter.make_features on the whitespace-tokenized sources; padding token "
    "'<blank>' (id 0), no <s>/</s> on the source. tgt_in_ids/tgt_out_ids: "
    "labels_inputter.make_features on the target text in decoder mode: ids = <s> tokens </s>, "
    "tgt_in = ids[:-1] with positions >= length zeroed, tgt_out = ids[1:], length = tokens + 1; "
    "padding id 0. encoder_output: model.encoder(features_inputter(features), training=False); "
    "logits: model._decode_target(labels, ...) (teacher forcing, training=False), [B, T, V]. "
    "decoding: model.serve_function() with model.params set per case (num_hypotheses = "
    "beam_width so every beam is returned); ids [B, W, T] are the returned tokens mapped back to "
    "target ids (bijective: <unk> is the last id); log_probs are what OpenNMT-tf returns (the "
    "cumulative log-probability of each hypothesis, no length/coverage normalisation; OpenNMT-tf "
    "returns no separate score). arrays.npz holds the same arrays plus float32 encoder_output, "
    "logits, forward_attention [B, T, S] and per-case alignment [B, W, T, S]."
)


def sample_keys_for(model_json):
    keys = [
        "model/examples_inputter/features_inputter/embedding/.ATTRIBUTES/VARIABLE_VALUE",
        "model/decoder/output_layer/bias/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    keys.append(
        "model/encoder/layers/0/self_attention/layer/linear_queries/kernel/"
        ".ATTRIBUTES/VARIABLE_VALUE"
    )
    return keys


def model_json(name, spec, vocab_files):
    kw = spec["kwargs"]
    return {
        "class": "opennmt.models.Transformer",
        "constructor_kwargs": kw,
        "pre_norm": kw.get("pre_norm", True),
        "sinusoidal_positions": kw.get("position_encoder_class", "default") is not None,
        "position_encoder_class": (
            "SinusoidalPositionEncoder"
            if kw.get("position_encoder_class", "default") is not None
            else None
        ),
        "maximum_relative_position": kw.get("maximum_relative_position"),
        "share_embeddings": kw.get("share_embeddings", "NONE"),
        "ffn_activation": "relu",
        "mha_bias": True,
        "output_layer_bias": True,
        "attention_reduction": "FIRST_HEAD_LAST_LAYER",
        "vocabulary_files": vocab_files,
        "task": {k: spec["task"][k] for k in ("order", "shared", "min_len", "max_len", "mapping")},
        "task_description": (
            "source: random sequences of min_len..max_len source tokens; target token = "
            "tgt_tokens[mapping[source token index]]; order as_is keeps the source order, "
            "reversed reverses it, sorted_unique sorts the distinct mapped indices ascending."
        ),
    }


def export_model_only(spec, out, train_prefix):
    """Saves the model variables of train_prefix alone, as OpenNMT-tf's Checkpoint does without
    an optimizer (keys model/..., save_counter, no optimizer/ and no .OPTIMIZER_SLOT)."""
    model, mapping = load_model(spec, out, train_prefix)
    step = checkpoint_util.get_step_from_checkpoint_prefix(str(train_prefix))
    tmp = out / "_export"
    if tmp.exists():
        shutil.rmtree(tmp)
    path = checkpoint_util.Checkpoint(model, model_dir=str(tmp), keep_checkpoint_max=1).save(step)
    name = copy_checkpoint(path, out)
    shutil.rmtree(tmp)
    train_reader = tf.train.load_checkpoint(str(train_prefix))
    reader = tf.train.load_checkpoint(str(out / name))
    keys = {k for k, _ in tf.train.list_variables(str(out / name)) if k.startswith("model/")}
    assert keys == set(mapping), keys ^ set(mapping)
    for key in keys:
        np.testing.assert_array_equal(reader.get_tensor(key), train_reader.get_tensor(key))
    return name


def run_model(name, work_root, reuse=False):
    spec = MODELS[name]
    out = OUT_ROOT / name
    work = work_root / name
    info_path = work / "info.json"
    if reuse and info_path.exists():
        # Debugging aid: keep the training run and the vocabularies, redo the goldens.
        info = json.loads(info_path.read_text())
        prefixes = [str(work / "run" / p) for p in info["checkpoints_written"]]
        _, tests, seen = make_data(spec["task"], info["seed"])
        for f in out.glob("ckpt-*"):
            f.unlink()
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if work.exists():
            shutil.rmtree(work)
        info, prefixes, tests, seen, _ = train_model(name, spec, work, out)
        info_path.write_text(json.dumps(info))
    if spec.get("model_only"):
        last = export_model_only(spec, out, prefixes[-1])
        info["fixture_checkpoint"] = (
            "model-only: the last training checkpoint restored into a fresh model and saved "
            "with opennmt.utils.checkpoint.Checkpoint(model, optimizer=None).save(step)"
        )
    else:
        last = copy_checkpoint(prefixes[-1], out)
        info["fixture_checkpoint"] = "the last training checkpoint, as Runner.train wrote it"
    write_checkpoint_state(out, [last])
    vocab_files = ["vocab.txt"] if spec["task"]["shared"] else ["src_vocab.txt", "tgt_vocab.txt"]
    mj = model_json(name, spec, vocab_files)
    mj["checkpoint"] = last
    mj["checkpoint_has_optimizer"] = not spec.get("model_only", False)
    mj["training"] = info
    write_json(out / "model.json", mj)
    collect_goldens(
        name,
        spec,
        out,
        out / last,
        tests,
        seen,
        {"model_json": mj, "training": info, "sample_keys": sample_keys_for(mj)},
    )
    return info, prefixes


def run_averaged(work_root):
    name = "averaged"
    spec = MODELS[AVERAGED_FROM]
    src_work = work_root / AVERAGED_FROM
    src_out = OUT_ROOT / AVERAGED_FROM
    state = tf.train.get_checkpoint_state(str(src_work / "run")) if src_work.exists() else None
    if state is None:
        run_model(AVERAGED_FROM, work_root)
        state = tf.train.get_checkpoint_state(str(src_work / "run"))
    prefixes = list(state.all_model_checkpoint_paths)[-AVERAGE_COUNT:]
    out = OUT_ROOT / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab_files = ["src_vocab.txt", "tgt_vocab.txt"]
    for f in vocab_files:
        shutil.copyfile(src_out / f, out / f)
    # opennmt.utils.checkpoint.average_checkpoints with the model alone as trackable (what
    # Runner.average_checkpoints does, less the optimizer), on the last 3 training checkpoints.
    avg_dir = work_root / "averaged_run"
    if avg_dir.exists():
        shutil.rmtree(avg_dir)
    model, _ = load_model(spec, out, prefixes[-1])
    checkpoint_util.average_checkpoints(
        prefixes, str(avg_dir), {"model": model}, max_count=AVERAGE_COUNT
    )
    avg_prefix = tf.train.latest_checkpoint(str(avg_dir))
    last = copy_checkpoint(avg_prefix, out)
    write_checkpoint_state(out, [last])
    # Check: every model variable is the float32 mean of the averaged checkpoints.
    readers = [tf.train.load_checkpoint(p) for p in prefixes]
    avg_reader = tf.train.load_checkpoint(str(out / last))
    max_err = 0.0
    for key, _ in tf.train.list_variables(str(out / last)):
        if key.startswith("model/") and ".OPTIMIZER_SLOT" not in key:
            mean = np.mean([r.get_tensor(key).astype(np.float64) for r in readers], axis=0)
            max_err = max(
                max_err, float(np.max(np.abs(avg_reader.get_tensor(key) - mean), initial=0.0))
            )
    assert max_err < 1e-5, max_err
    mj = model_json(name, spec, vocab_files)
    mj["checkpoint"] = last
    mj["checkpoint_has_optimizer"] = False
    avg_info = {
        "averaged_from": AVERAGED_FROM,
        "averaged_checkpoints": [Path(p).name for p in prefixes],
        "method": "opennmt.utils.checkpoint.average_checkpoints(paths, output_dir, "
        "{'model': model}, max_count=3): each model variable = sum of "
        "value / 3 accumulated in float32 (assign_add); model-only checkpoint",
        "max_abs_diff_vs_float64_mean": max_err,
    }
    mj["training"] = avg_info
    write_json(out / "model.json", mj)
    _, tests, seen = make_data(spec["task"], MASTER_SEED + ALL_NAMES.index(AVERAGED_FROM))
    collect_goldens(
        name,
        spec,
        out,
        out / last,
        tests,
        seen,
        {"model_json": mj, "training": avg_info, "sample_keys": sample_keys_for(mj)},
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=ALL_NAMES, default=None)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the training runs left in --work (debugging only)",
    )
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.get_logger().setLevel("INFO")
    names = args.only or ALL_NAMES
    t0 = time.time()
    for name in ALL_NAMES:
        if name not in names:
            continue
        t = time.time()
        if name == "bundle_dtypes":
            bundle_dtypes(OUT_ROOT / name)
        elif name == "averaged":
            run_averaged(args.work)
        else:
            run_model(name, args.work, reuse=args.reuse)
        print(f"{name}: {time.time() - t:.1f} s")
    print(f"total {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
