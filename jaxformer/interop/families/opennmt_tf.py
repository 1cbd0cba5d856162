"""OpenNMT-tf V2 Transformers: the config read from the checkpoint's variables and the hints, and
the variables' names (``interop/opennmt_tf.py`` reads the checkpoint and builds the ``Pretrained``).

What the checkpoint stores, and is read from it: the layers, ``num_units``, ``ffn_inner_dim``, the
vocabulary sizes, the relative position range, pre- or post-norm, shared embeddings and the output
bias. What it does not store comes as hints (``num_heads``, ``positions``, ``model``, ...). The
model computes what OpenNMT-tf computes (``models.presets.OPENNMT_TF``): layer norm epsilon 1e-3,
OpenNMT-tf's sinusoids, a bias on the output projection whether it is tied or not. Variables are
named ``{encoder,decoder}/layers/{i}/...`` (the ``model/`` prefix and the
``/.ATTRIBUTES/VARIABLE_VALUE`` suffix removed), kernels stored ``[in, out]``.
"""

from __future__ import annotations

import re

from jaxformer.interop.weights import (
    CheckpointError,
    Table,
    Tensors,
    attention,
    kernel,
    norm,
    same,
)
from jaxformer.models.config import TransformerConfig
from jaxformer.models.encoder_decoder import Transformer
from jaxformer.models.presets import OPENNMT_TF, OPENNMT_TF_PRESETS

MODEL = Transformer
PAD_ID = 0  # OpenNMT-tf's <blank>


def _count(t: Tensors, stack: str) -> int:
    found = {int(m.group(1)) for k in t.names if (m := re.match(rf"{stack}/layers/(\d+)/", k))}
    return max(found) + 1 if found else 0


def embedding_names(t: Tensors) -> tuple[str | None, str | None]:
    names = [k for k in t.names if k.endswith("/embedding") and "inputter" in k]
    source = next((k for k in names if "features_inputter" in k), None)
    target = next((k for k in names if "labels_inputter" in k), None)
    if target is None and source is not None:  # EmbeddingsSharingLevel.ALL: one table, the source's
        return source, source
    return source, target


def config(t: Tensors, hints: dict) -> TransformerConfig:
    """The config the checkpoint's variables and the hints describe (errors name what is missing)."""
    source, target = embedding_names(t)
    if target is None:
        raise CheckpointError(f"{t.what}: no target embedding (labels_inputter) found")
    tgt_vocab, d_model = t.shape(target)
    src_vocab = t.shape(source)[0] if source is not None else tgt_vocab
    ffn_dim = t.shape("encoder/layers/0/ffn/layer/inner/kernel")[1]
    relative_name = "encoder/layers/0/self_attention/layer/relative_position_keys"
    relative = t.shape(relative_name) if t.has(relative_name) else None
    base = _base(hints, t.what)
    num_heads, positions = _heads_and_positions(hints, base, relative, d_model, t.what)
    config = (base or TransformerConfig(**OPENNMT_TF)).replace(
        vocab_size=tgt_vocab,
        src_vocab_size=None if src_vocab == tgt_vocab else src_vocab,
        d_model=d_model,
        num_heads=num_heads,
        num_encoder_layers=_count(t, "encoder"),
        num_decoder_layers=_count(t, "decoder"),
        ffn_dim=ffn_dim,
        pre_norm=t.has("encoder/layers/0/self_attention/input_layer_norm/gamma"),
        maximum_relative_position=0 if relative is None else (relative[0] - 1) // 2,
        positions=positions,
        share_embeddings=source == target,
        share_output_embeddings=not t.has("decoder/output_layer/kernel"),
        output_bias=t.has("decoder/output_layer/bias"),
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
        by_table = d_model // relative[1]
        if num_heads is not None and num_heads != by_table:
            raise CheckpointError(
                f"{what}: num_heads={num_heads} does not fit the relative position tables "
                f"(head width {relative[1]}, num_units {d_model}: {by_table} heads)"
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


def table(c: TransformerConfig, t: Tensors) -> Table:
    source, target = embedding_names(t)
    out: Table = {"target_embedding/embedding": same(target)}
    if not c.share_embeddings:
        out["source_embedding/embedding"] = same(source)
    if c.share_output_embeddings:
        if c.has_output_bias:
            out["output_bias"] = same("decoder/output_layer/bias")
    else:
        out |= _dense("output", "decoder/output_layer", c.has_output_bias)
    for stack in ("encoder", "decoder"):
        decoder = stack == "decoder"
        for i in range(c.num_decoder_layers if decoder else c.num_encoder_layers):
            out |= _layer(c, f"{stack}/layer_{i}", f"{stack}/layers/{i}", decoder)
        if c.has_final_norm:
            out |= _norm(f"{stack}/final_norm", f"{stack}/layer_norm")
    return out


def _dense(ours: str, theirs: str, bias: bool = True, inputs: int = 1) -> Table:
    out: Table = {f"{ours}/kernel": kernel(f"{theirs}/kernel", inputs)}
    if bias:
        out[f"{ours}/bias"] = same(f"{theirs}/bias")
    return out


def _norm(ours: str, theirs: str) -> Table:
    return norm(ours, f"{theirs}/gamma", f"{theirs}/beta")


def _wrapped(c, ours: str, theirs: str) -> Table:
    """A TransformerLayerWrapper's norm: before the sublayer (pre-norm) or after it (post-norm)."""
    return _norm(ours, f"{theirs}/{'input' if c.pre_norm else 'output'}_layer_norm")


def _attention(c, ours: str, theirs: str, self_attention: bool) -> Table:
    q, k, v, o = (f"{theirs}/linear_{x}/kernel" for x in ("queries", "keys", "values", "output"))
    out = attention(
        c, ours, q, k, v, o, fused=self_attention, weight=kernel,
        bias=lambda name: name.removesuffix("/kernel") + "/bias",
    )  # fmt: skip
    if self_attention and c.relative:
        out[f"{ours}/relative_keys"] = same(f"{theirs}/relative_position_keys")
        out[f"{ours}/relative_values"] = same(f"{theirs}/relative_position_values")
    return out


def _layer(c, ours: str, theirs: str, decoder: bool) -> Table:
    out = {
        **_attention(c, f"{ours}/self_attention", f"{theirs}/self_attention/layer", True),
        **_dense(f"{ours}/ffn/inner", f"{theirs}/ffn/layer/inner"),
        **_dense(f"{ours}/ffn/outer", f"{theirs}/ffn/layer/outer"),
        **_wrapped(c, f"{ours}/norm_ffn", f"{theirs}/ffn"),
    }
    if decoder:
        out |= _wrapped(c, f"{ours}/norm_self", f"{theirs}/self_attention")
        out |= _attention(c, f"{ours}/memory_attention", f"{theirs}/attention/0/layer", False)
        out |= _wrapped(c, f"{ours}/norm_memory", f"{theirs}/attention/0")
    else:
        out |= _wrapped(c, f"{ours}/norm_attention", f"{theirs}/self_attention")
    return out
