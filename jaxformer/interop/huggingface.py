"""Hugging Face model directories as jaxformer Transformers: ``config.json`` + ``*.safetensors``.

Read with the ``safetensors`` numpy API: no torch and no transformers at run time. Families
(``model_type`` in ``config.json``):

- ``marian`` (OPUS-MT): post-norm, fixed sinusoids ``[sin | cos]`` from position 0, scaled
  embeddings, swish, ``final_logits_bias``; source and target tables shared or not
  (``share_encoder_decoder_embeddings``); the decoder starts from ``<pad>``.
- ``m2m_100`` (M2M100 and NLLB-200): pre-norm with final norms, sinusoids ``[sin | cos]`` with rates
  ``10000^(-i / (D/2 - 1))`` starting at position ``pad_token_id + 1``; the decoder starts from
  ``</s>`` and the target language is forced as the first token (``target_prefix``).
- ``bart`` / ``mbart``: learned positions with offset 2, ``layernorm_embedding``, post-norm (BART)
  or pre-norm with final norms (mBART), ``final_logits_bias``.
- ``t5`` / ``mt5`` (and MADLAD-400, a ``t5``): RMS norms, no biases, no query scaling, bucketed
  relative attention bias in the first layer of each stack, ``d_kv`` heads, relu or gated GELU,
  tied output scaled by ``d_model**-0.5`` (v1.0) or an untied ``lm_head`` (v1.1, mT5).

Each config field maps to a ``TransformerConfig`` option; a field jaxformer does not implement
(different encoder and decoder widths, an unknown activation) raises instead of being ignored, and
every tensor of the checkpoint must be explained by the config (``weights.Tensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxformer.interop.files import read_json_object, read_safetensors
from jaxformer.interop.weights import (
    CheckpointError,
    Tensors,
    attention_params,
    check_tree,
    dense,
    linear,
    norm_params,
)
from jaxformer.models.config import TransformerConfig

BART_LIKE = ("marian", "m2m100", "bart", "mbart")
T5_LIKE = ("t5", "mt5")
MODEL_TYPES = BART_LIKE + T5_LIKE
ALIASES = {"m2m_100": "m2m100"}  # transformers' spelling in M2M100 / NLLB config.json files
ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "swish": "silu",
    "silu": "silu",
}


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    config = read_json_object(path)
    model_type = ALIASES.get(config.get("model_type"), config.get("model_type"))
    config["model_type"] = model_type
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported; jaxformer loads "
            f"{', '.join(MODEL_TYPES)} (encoder-decoder translation models)"
        )
    return config


def read_generation_config(directory: Path) -> dict[str, Any]:
    return read_json_object(directory / "generation_config.json", missing={})


def read_tensors(directory: Path) -> Tensors:
    """Every tensor of ``model.safetensors`` or of the shards its index lists."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f'{index}: no "weight_map" of tensor names to files')
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        weight_map = None
    if not files:
        found = sorted(p.name for p in directory.iterdir())
        torch_files = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (
            f" (it has {torch_files}: PyTorch pickles, which jaxformer does not read; convert them "
            "once with `safetensors.torch.save_file` or transformers' `save_pretrained`)"
            if torch_files
            else ""
        )
        raise CheckpointError(f"{directory}: no *.safetensors weights{hint}")
    arrays: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{index}: lists {name}, which is missing from {directory}")
        for key, array in read_safetensors(path).items():
            arrays[key] = array
            origin[key] = str(path)
    listed = ", ".join(str(directory / name) for name in files)
    where = lambda key: origin.get(key) or (weight_map or {}).get(key) or listed
    return Tensors(arrays, where, f"the Hugging Face model in {directory}")


def _get(config: dict, name: str, path: str, default: Any = None, required: bool = True):
    if name in config and config[name] is not None:
        return config[name]
    if required and default is None:
        raise CheckpointError(f"{path}: config.json has no {name!r}")
    return default


def _same(config: dict, a: str, b: str, path: str):
    if config.get(b) is not None and config[b] != config[a]:
        raise CheckpointError(
            f"{path}: {a}={config[a]} differs from {b}={config[b]}; jaxformer needs the encoder "
            "and the decoder to have the same width"
        )
    return config[a]


def _activation(name: str, path: str, field: str) -> str:
    if name not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: {field}={name!r} is not supported; jaxformer has {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def to_config(config: dict[str, Any], path: str, max_len: int | None = None) -> TransformerConfig:
    """The ``TransformerConfig`` a Hugging Face ``config.json`` describes."""
    model_type = config["model_type"]
    if model_type in T5_LIKE:
        return _t5_config(config, path, max_len)
    return _bart_config(config, path, max_len)


def _bart_config(config: dict, path: str, max_len: int | None) -> TransformerConfig:
    model_type = config["model_type"]
    get = lambda name, default=None: _get(config, name, path, default)
    d_model = get("d_model")
    vocab = get("vocab_size")
    shared = model_type != "marian" or config.get("share_encoder_decoder_embeddings", True)
    target_vocab = vocab if shared else config.get("decoder_vocab_size") or vocab
    pad = get("pad_token_id")
    kind = {
        "marian": dict(pre_norm=False, positions="sinusoidal", position_layout="concat"),
        "m2m100": dict(
            pre_norm=True,
            positions="sinusoidal",
            position_layout="concat",
            position_rate_denominator="D/2-1",
            position_offset=pad + 1,
        ),
        "bart": dict(pre_norm=False, positions="learned", position_offset=2, embedding_norm=True),
        "mbart": dict(pre_norm=True, positions="learned", position_offset=2, embedding_norm=True),
    }[model_type]
    positions = get("max_position_embeddings")
    return TransformerConfig(
        vocab_size=target_vocab,
        src_vocab_size=None if target_vocab == vocab else vocab,
        d_model=d_model,
        num_heads=_same(config, "encoder_attention_heads", "decoder_attention_heads", path),
        num_encoder_layers=get("encoder_layers"),
        num_decoder_layers=get("decoder_layers"),
        ffn_dim=_same(config, "encoder_ffn_dim", "decoder_ffn_dim", path),
        dropout=float(config.get("dropout", 0.0)),
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        ffn_dropout=float(config.get("activation_dropout", 0.0)),
        max_len=positions if max_len is None else min(max_len, positions),
        share_embeddings=shared,
        share_output_embeddings=config.get("tie_word_embeddings", True),
        pad_id=pad,
        layer_norm_epsilon=1e-5,  # torch.nn.LayerNorm's default, which these models use
        activation=_activation(get("activation_function"), path, "activation_function"),
        embedding_scale=float(np.sqrt(d_model)) if config.get("scale_embedding") else 1.0,
        final_logits_bias=model_type != "m2m100",
        output_bias=False,
        **kind,
    )


def _t5_config(config: dict, path: str, max_len: int | None) -> TransformerConfig:
    get = lambda name, default=None: _get(config, name, path, default)
    proj = get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    base = proj.removeprefix("gated-")
    if gated and base == "gelu":
        base = "gelu_new"  # transformers' rule for "gated-gelu" (T5 v1.1, mT5)
    activation = _activation(base, path, "feed_forward_proj")
    tied = config.get("tie_word_embeddings", True)
    # transformers 5 saves ``scale_decoder_outputs`` (the d_model**-0.5 before a tied output);
    # older configs imply it by ``tie_word_embeddings``.
    scale = config.get("scale_decoder_outputs", tied)
    if scale and not tied:
        raise CheckpointError(
            f"{path}: scale_decoder_outputs without tie_word_embeddings is not supported"
        )
    return TransformerConfig(
        vocab_size=get("vocab_size"),
        d_model=get("d_model"),
        num_heads=get("num_heads"),
        num_encoder_layers=get("num_layers"),
        num_decoder_layers=config.get("num_decoder_layers") or get("num_layers"),
        ffn_dim=get("d_ff"),
        dropout=float(config.get("dropout_rate", 0.0)),
        attention_dropout=float(config.get("dropout_rate", 0.0)),
        ffn_dropout=float(config.get("dropout_rate", 0.0)),
        max_len=max_len or 1024,  # relative positions: no table bounds it; a hint may raise it
        share_embeddings=True,
        share_output_embeddings=tied,
        pad_id=get("pad_token_id", 0),
        layer_norm_epsilon=float(get("layer_norm_epsilon", 1e-6)),
        norm="rms",
        pre_norm=True,
        activation=("gated-" if gated else "") + activation,
        positions="none",
        embedding_scale=1.0,
        output_bias=False,
        tied_output_scale=bool(scale),
        attention_head_dim=get("d_kv"),
        query_scaling=False,
        attention_bias=False,
        ffn_bias=False,
        relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=get("relative_attention_max_distance", 128),
    )


def to_params(
    tensors: Tensors, c: TransformerConfig, model_type: str, expected: dict
) -> dict[str, Any]:
    """jaxformer's parameter tree from the checkpoint's tensors (every tensor used, shapes checked)."""
    if model_type in T5_LIKE:
        params = _t5_params(tensors, c)
    else:
        params = _bart_params(tensors, c, model_type)
    tensors.check_all_used()
    check_tree(params, expected, tensors.what)
    return params


def _torch_dense(t: Tensors, name: str, n_in: int, n_out: int, bias: bool = True):
    kernel = linear(t.take(f"{name}.weight", (n_out, n_in)), torch_layout=True)
    return kernel, (t.take(f"{name}.bias", (n_out,)) if bias else None)


def _torch_norm(t: Tensors, name: str, d: int, bias: bool = True):
    return norm_params(
        t.take(f"{name}.weight", (d,)), t.take(f"{name}.bias", (d,)) if bias else None
    )


def _bart_attention(t: Tensors, name: str, c: TransformerConfig, self_attention: bool):
    d, inner = c.d_model, c.num_heads * c.head_dim
    parts = [_torch_dense(t, f"{name}.{p}_proj", d, inner) for p in "qkv"]
    out = _torch_dense(t, f"{name}.out_proj", inner, d)
    return attention_params(*parts, out, c.num_heads, c.head_dim, self_attention)


def _bart_ffn(t: Tensors, name: str, c: TransformerConfig):
    return {
        "inner": dense(*_torch_dense(t, f"{name}.fc1", c.d_model, c.ffn_dim)),
        "outer": dense(*_torch_dense(t, f"{name}.fc2", c.ffn_dim, c.d_model)),
    }


def _bart_params(t: Tensors, c: TransformerConfig, model_type: str) -> dict[str, Any]:
    p = "model." if any(k.startswith("model.") for k in t.arrays) else ""
    d = c.d_model
    params: dict[str, Any] = {}
    aliases = [f"{p}shared.weight", f"{p}encoder.embed_tokens.weight"]
    if c.share_embeddings:
        aliases.append(f"{p}decoder.embed_tokens.weight")
        params["target_embedding"] = {"embedding": t.first(aliases, (c.vocab_size, d))}
    else:
        source = t.first(aliases, (c.source_vocab_size, d))
        params["source_embedding"] = {"embedding": source}
        target = t.take(f"{p}decoder.embed_tokens.weight", (c.vocab_size, d))
        params["target_embedding"] = {"embedding": target}
    tied = [f"{p}decoder.embed_tokens.weight"] if c.share_embeddings else []
    if c.share_output_embeddings:
        tied.append("lm_head.weight")
    _skip_copies(t, params["target_embedding"]["embedding"], tied)
    if c.share_embeddings:
        _skip_copies(t, params["target_embedding"]["embedding"], aliases)
    if not c.share_output_embeddings:
        params["output"] = {"kernel": linear(t.take("lm_head.weight", (c.vocab_size, d)), True)}
    if c.final_logits_bias:
        params["final_logits_bias"] = t.take("final_logits_bias", (1, c.vocab_size))[0]
    if c.absolute_positions == "sinusoidal":  # fixed tables, computed (some checkpoints store them)
        t.skip(lambda name: name.endswith("embed_positions.weight"))
    else:
        rows = c.max_len + c.position_offset
        for side, stack in (("source", "encoder"), ("target", "decoder")):
            table = t.take(f"{p}{stack}.embed_positions.weight")
            if table.shape[0] < rows or table.shape[1] != d:
                raise CheckpointError(
                    f"tensor {p}{stack}.embed_positions.weight has shape {table.shape}, the "
                    f"configuration implies ({rows}, {d})"
                )
            params[f"{side}_positions"] = {"embedding": table[:rows]}
    if c.embedding_norm:
        for side, stack in (("source", "encoder"), ("target", "decoder")):
            params[f"{side}_embedding_norm"] = _torch_norm(t, f"{p}{stack}.layernorm_embedding", d)
    params["encoder"] = _bart_stack(t, f"{p}encoder", c, decoder=False)
    params["decoder"] = _bart_stack(t, f"{p}decoder", c, decoder=True)
    return params


def _skip_copies(t: Tensors, table: np.ndarray, names: list[str]) -> None:
    """Tied tensors stored more than once: accepted when equal to the table read."""
    for name in names:
        if t.has(name) and name not in t.used:
            copy = t.take(name)
            if copy.shape != table.shape or not np.array_equal(copy, table):
                raise CheckpointError(
                    f"tensor {name!r} in {t.where(name)} should be tied to the embedding table "
                    "(the config says so) but differs from it"
                )


def _bart_stack(t: Tensors, name: str, c: TransformerConfig, decoder: bool) -> dict[str, Any]:
    d = c.d_model
    layers = c.num_decoder_layers if decoder else c.num_encoder_layers
    stack: dict[str, Any] = {}
    for i in range(layers):
        layer = f"{name}.layers.{i}"
        params = {
            "self_attention": _bart_attention(t, f"{layer}.self_attn", c, True),
            "ffn": _bart_ffn(t, layer, c),
            "norm_ffn": _torch_norm(t, f"{layer}.final_layer_norm", d),
        }
        if decoder:
            params["norm_self"] = _torch_norm(t, f"{layer}.self_attn_layer_norm", d)
            params["memory_attention"] = _bart_attention(t, f"{layer}.encoder_attn", c, False)
            params["norm_memory"] = _torch_norm(t, f"{layer}.encoder_attn_layer_norm", d)
        else:
            params["norm_attention"] = _torch_norm(t, f"{layer}.self_attn_layer_norm", d)
        stack[f"layer_{i}"] = params
    if c.has_final_norm:
        stack["final_norm"] = _torch_norm(t, f"{name}.layer_norm", d)
    return stack


def _t5_attention(t: Tensors, name: str, c: TransformerConfig, self_attention: bool):
    d, inner = c.d_model, c.num_heads * c.head_dim
    parts = [_torch_dense(t, f"{name}.{p}", d, inner, bias=False) for p in "qkv"]
    out = _torch_dense(t, f"{name}.o", inner, d, bias=False)
    return attention_params(*parts, out, c.num_heads, c.head_dim, self_attention)


def _t5_ffn(t: Tensors, name: str, c: TransformerConfig):
    d, f = c.d_model, c.ffn_dim
    if c.activation.startswith("gated-"):
        ffn = {
            "inner": dense(*_torch_dense(t, f"{name}.wi_0", d, f, bias=False)),
            "inner_linear": dense(*_torch_dense(t, f"{name}.wi_1", d, f, bias=False)),
        }
    else:
        ffn = {"inner": dense(*_torch_dense(t, f"{name}.wi", d, f, bias=False))}
    ffn["outer"] = dense(*_torch_dense(t, f"{name}.wo", f, d, bias=False))
    return ffn


def _t5_params(t: Tensors, c: TransformerConfig) -> dict[str, Any]:
    d = c.d_model
    aliases = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    table = t.first(aliases, (c.vocab_size, d))
    tied = aliases + (["lm_head.weight"] if c.share_output_embeddings else [])
    _skip_copies(t, table, tied)
    params: dict[str, Any] = {"target_embedding": {"embedding": table}}
    if not c.share_output_embeddings:
        params["output"] = {"kernel": linear(t.take("lm_head.weight", (c.vocab_size, d)), True)}
    for stack, decoder in (("encoder", False), ("decoder", True)):
        layers = c.num_decoder_layers if decoder else c.num_encoder_layers
        tree: dict[str, Any] = {}
        for i in range(layers):
            block = f"{stack}.block.{i}.layer"
            norm = lambda j, block=block: _torch_norm(t, f"{block}.{j}.layer_norm", d, bias=False)
            layer = {"self_attention": _t5_attention(t, f"{block}.0.SelfAttention", c, True)}
            if decoder:
                layer["norm_self"] = norm(0)
                layer["memory_attention"] = _t5_attention(t, f"{block}.1.EncDecAttention", c, False)
                layer["norm_memory"] = norm(1)
                layer["ffn"] = _t5_ffn(t, f"{block}.2.DenseReluDense", c)
                layer["norm_ffn"] = norm(2)
            else:
                layer["norm_attention"] = norm(0)
                layer["ffn"] = _t5_ffn(t, f"{block}.1.DenseReluDense", c)
                layer["norm_ffn"] = norm(1)
            tree[f"layer_{i}"] = layer
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        tree["relative_attention_bias"] = t.take(
            bias, (c.relative_attention_num_buckets, c.num_heads)
        )
        tree["final_norm"] = _torch_norm(t, f"{stack}.final_layer_norm", d, bias=False)
        params[stack] = tree
    return params
