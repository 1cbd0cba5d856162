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

The model computes what OpenNMT-tf computes (``models.presets.OPENNMT_TF``): layer norm epsilon 1e-3,
OpenNMT-tf's sinusoids, a bias on the output projection whether it is tied or not.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import ClassVar

import jax

from jaxformer.data.tokenizers import Ids
from jaxformer.interop import tf_checkpoint
from jaxformer.interop.weights import (
    CheckpointError,
    Tensors,
    attention_params,
    check_tree,
    dense,
    norm_params,
)
from jaxformer.models.config import TransformerConfig
from jaxformer.models.encoder_decoder import Transformer
from jaxformer.models.presets import OPENNMT_TF, OPENNMT_TF_PRESETS

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
    return Tensors(arrays, where, f"the OpenNMT-tf checkpoint {prefix}")


def _count(t: Tensors, stack: str) -> int:
    found = {int(m.group(1)) for k in t.arrays if (m := re.match(rf"{stack}/layers/(\d+)/", k))}
    return max(found) + 1 if found else 0


def _embedding_names(t: Tensors) -> tuple[str | None, str | None]:
    names = [k for k in t.arrays if k.endswith("/embedding") and "inputter" in k]
    source = next((k for k in names if "features_inputter" in k), None)
    target = next((k for k in names if "labels_inputter" in k), None)
    if target is None and source is not None:  # EmbeddingsSharingLevel.ALL: one table, the source's
        return source, source
    return source, target


def infer_config(t: Tensors, hints: dict) -> TransformerConfig:
    """The config the checkpoint's variables and the hints describe (errors name what is missing)."""
    source, target = _embedding_names(t)
    if target is None:
        raise CheckpointError(f"{t.what}: no target embedding (labels_inputter) found")
    tgt_vocab, d_model = t.arrays[target].shape
    src_vocab = t.arrays[source].shape[0] if source is not None else tgt_vocab
    layers = _count(t, "encoder"), _count(t, "decoder")
    ffn_dim = t.arrays["encoder/layers/0/ffn/layer/inner/kernel"].shape[1]
    pre_norm = "encoder/layers/0/self_attention/input_layer_norm/gamma" in t.arrays
    relative = t.arrays.get("encoder/layers/0/self_attention/layer/relative_position_keys")
    base = _base(hints, t.what)
    num_heads, positions = _heads_and_positions(hints, base, relative, d_model, t.what)
    shared_output = "decoder/output_layer/kernel" not in t.arrays
    config = (base or TransformerConfig(**OPENNMT_TF)).replace(
        vocab_size=tgt_vocab,
        src_vocab_size=None if src_vocab == tgt_vocab else src_vocab,
        d_model=d_model,
        num_heads=num_heads,
        num_encoder_layers=layers[0],
        num_decoder_layers=layers[1],
        ffn_dim=ffn_dim,
        pre_norm=pre_norm,
        maximum_relative_position=0 if relative is None else (relative.shape[0] - 1) // 2,
        positions=positions,
        share_embeddings=source == target,
        share_output_embeddings=shared_output,
        output_bias="decoder/output_layer/bias" in t.arrays,
        activation=hints.get("activation", "relu"),
        max_len=hints.get("max_len", 1024),
        pad_id=PAD_ID,
    )
    return config.replace(dtype=hints["dtype"]) if "dtype" in hints else config


def _base(hints: dict, what: str) -> TransformerConfig | None:
    name = hints.get("model")
    if name is None:
        return None
    if name not in OPENNMT_TF_PRESETS:
        raise ValueError(
            f"load_pretrained: model={name!r} is not an OpenNMT-tf catalog model; choose one of "
            f"{sorted(OPENNMT_TF_PRESETS)} or pass num_heads= and positions= for {what}"
        )
    return OPENNMT_TF_PRESETS[name]


def _heads_and_positions(hints, base, relative, d_model: int, what: str) -> tuple[int, str]:
    num_heads = hints.get("num_heads", base.num_heads if base else None)
    if relative is not None:
        by_table = d_model // relative.shape[1]
        if num_heads is not None and num_heads != by_table:
            raise CheckpointError(
                f"{what}: num_heads={num_heads} does not fit the relative position tables "
                f"(head width {relative.shape[1]}, num_units {d_model}: {by_table} heads)"
            )
        num_heads = by_table
    if num_heads is None:
        raise CheckpointError(
            f"{what}: an OpenNMT-tf checkpoint does not store the number of heads; pass "
            "num_heads=N (or model='TransformerBase' etc., a catalog name)"
        )
    if not isinstance(num_heads, int) or num_heads < 1 or d_model % num_heads:
        raise CheckpointError(
            f"{what}: num_heads={num_heads!r} must be an int dividing num_units={d_model}"
        )
    positions = hints.get("positions", base.absolute_positions if base else None)
    if positions is None:
        if relative is not None:
            raise CheckpointError(
                f"{what}: with relative positions, OpenNMT-tf keeps its sinusoids unless the "
                "model sets position_encoder_class=None (the catalog's *Relative models do); the "
                "checkpoint cannot tell: pass positions='none' or positions='sinusoidal'"
            )
        positions = "sinusoidal"
    if positions not in ("sinusoidal", "none"):
        raise ValueError(
            f"load_pretrained: positions must be 'sinusoidal' or 'none', got {positions!r}"
        )
    return num_heads, positions


def to_params(t: Tensors, c: TransformerConfig, expected: dict) -> dict:
    source, target = _embedding_names(t)
    params: dict = {"target_embedding": {"embedding": t.take(target, (c.vocab_size, c.d_model))}}
    if not c.share_embeddings:
        table = t.take(source, (c.source_vocab_size, c.d_model))
        params["source_embedding"] = {"embedding": table}
    if c.share_output_embeddings:
        if c.has_output_bias:
            params["output_bias"] = t.take("decoder/output_layer/bias", (c.vocab_size,))
    else:
        kernel = t.take("decoder/output_layer/kernel", (c.d_model, c.vocab_size))
        bias = t.take("decoder/output_layer/bias", (c.vocab_size,)) if c.has_output_bias else None
        params["output"] = dense(kernel, bias)
    params["encoder"] = _stack(t, "encoder", c, c.num_encoder_layers, decoder=False)
    params["decoder"] = _stack(t, "decoder", c, c.num_decoder_layers, decoder=True)
    t.check_all_used()
    check_tree(params, expected, t.what)
    return params


def _norm(t: Tensors, name: str, d: int):
    return norm_params(t.take(f"{name}/gamma", (d,)), t.take(f"{name}/beta", (d,)))


def _wrapped(t: Tensors, name: str, c: TransformerConfig):
    """A TransformerLayerWrapper's norm: before the sublayer (pre-norm) or after it (post-norm)."""
    return _norm(t, f"{name}/{'input' if c.pre_norm else 'output'}_layer_norm", c.d_model)


def _attention(t: Tensors, name: str, c: TransformerConfig, self_attention: bool):
    d = c.d_model
    take = lambda p: (
        t.take(f"{name}/{p}/kernel", (d, d)),
        t.take(f"{name}/{p}/bias", (d,)) if f"{name}/{p}/bias" in t.arrays else None,
    )
    parts = [take(p) for p in ("linear_queries", "linear_keys", "linear_values", "linear_output")]
    params = attention_params(*parts, c.num_heads, c.head_dim, self_attention)
    if self_attention and c.relative:
        rows = (2 * c.maximum_relative_position + 1, c.head_dim)
        params["relative_keys"] = t.take(f"{name}/relative_position_keys", rows)
        params["relative_values"] = t.take(f"{name}/relative_position_values", rows)
    return params


def _stack(t: Tensors, stack: str, c: TransformerConfig, layers: int, decoder: bool) -> dict:
    d, f = c.d_model, c.ffn_dim
    tree: dict = {}
    for i in range(layers):
        layer = f"{stack}/layers/{i}"
        ffn = f"{layer}/ffn/layer"
        params = {
            "self_attention": _attention(t, f"{layer}/self_attention/layer", c, True),
            "ffn": {
                "inner": dense(
                    t.take(f"{ffn}/inner/kernel", (d, f)), t.take(f"{ffn}/inner/bias", (f,))
                ),
                "outer": dense(
                    t.take(f"{ffn}/outer/kernel", (f, d)), t.take(f"{ffn}/outer/bias", (d,))
                ),
            },
            "norm_ffn": _wrapped(t, f"{layer}/ffn", c),
        }
        if decoder:
            params["norm_self"] = _wrapped(t, f"{layer}/self_attention", c)
            params["memory_attention"] = _attention(t, f"{layer}/attention/0/layer", c, False)
            params["norm_memory"] = _wrapped(t, f"{layer}/attention/0", c)
        else:
            params["norm_attention"] = _wrapped(t, f"{layer}/self_attention", c)
        tree[f"layer_{i}"] = params
    if c.has_final_norm:
        tree["final_norm"] = _norm(t, f"{stack}/layer_norm", d)
    return tree


def load(path: str | Path, **hints):
    """An OpenNMT-tf checkpoint as a ``Pretrained`` (see the module docstring for the hints)."""
    from jaxformer.interop.pretrained import Pretrained, check_hints, shapes_of

    check_hints(hints, HINTS, "an OpenNMT-tf checkpoint")
    prefix = tf_checkpoint.resolve_checkpoint(path)
    tensors = model_tensors(prefix)
    config = infer_config(tensors, hints)
    model = Transformer(config)
    params = to_params(tensors, config, shapes_of(model))
    source, target = (
        _vocabulary(hints.get(name), size, name)
        for name, size in (
            ("source_vocabulary", config.source_vocab_size),
            ("target_vocabulary", config.vocab_size),
        )
    )
    return Pretrained(
        model=model,
        params=jax.tree_util.tree_map(jax.numpy.asarray, params),
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
