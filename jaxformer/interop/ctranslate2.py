"""Write a jaxformer encoder-decoder as a CTranslate2 model directory.

The model is described with CTranslate2's own specification classes (``ctranslate2.specs``) and saved by
its ``Converter`` machinery (validation, aliasing of shared weights, optional quantization), so the
directory is whatever the installed CTranslate2 itself writes: ``model.bin``, ``config.json`` and the
vocabularies (``shared_vocabulary.json`` when source and target are the same list).

How jaxformer's parameters map onto the specification (kernels are ``[in, out]`` in Flax and
``[out, in]`` in CTranslate2, hence the transposes):

=====================================  =================================================================
jaxformer                              CTranslate2 spec
=====================================  =================================================================
``*_embedding/embedding [V, D]``       ``embeddings.weight``; ``scale_embeddings`` multiplies by sqrt(D)
sinusoidal table ``[max_len, D]``      ``position_encodings.encodings`` (given explicitly: our channels
                                       interleave sin/cos, CTranslate2's built-in table concatenates them)
``maximum_relative_position`` M > 0    ``relative_position_keys/values [2M+1, H]``; no position table
``self_attention/qkv [D, 3, N, H]``    ``self_attention.linear[0]`` fused ``[3D, D]``: q, k, v stacked
``memory_attention/query``, ``kv``     ``attention.linear[0]`` ``[D, D]``, ``linear[1]`` fused ``[2D, D]``
``*/out [N, H, D]``                    ``linear[-1]`` ``[D, D]``
``norm_self`` / ``norm_attention``     ``self_attention.layer_norm``; ``norm_memory``: ``attention.
                                       layer_norm``; ``norm_ffn``: ``ffn.layer_norm`` (before the
                                       sublayer in pre-norm, after the residual in post-norm)
``ffn/inner``, ``ffn/outer``           ``ffn.linear_0``, ``ffn.linear_1`` (ReLU between)
``final_norm`` (pre-norm only)         ``encoder.layer_norm``, ``decoder.layer_norm``
``output`` or the tied table           ``decoder.projection`` (no bias when tied)
=====================================  =================================================================

Token ids: jaxformer uses pad 0, bos 1, eos 2, unk 3, the order of OpenNMT's ``<blank> <s> </s> <unk>``.
CTranslate2 finds its special tokens by string, so the model's ``config.json`` names the strings that
sit at ids 1, 2 and 3 of the given vocabularies. ``ids_vocab(n)`` makes a vocabulary of placeholder
strings for callers that work with ids only.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxformer.models.config import TransformerConfig
from jaxformer.models.positions import sinusoidal_table

SPECIAL_TOKENS = ("<blank>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos, unk
LAYER_NORM_EPSILON = 1e-6  # jaxformer.models.layers.layer_norm
QUANTIZATIONS = (
    None,
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


def ids_vocab(size: int) -> list[str]:
    """A vocabulary of ``size`` placeholder tokens: the four specials, then ``"4"``, ``"5"``, ...

    Token i (i >= 4) is the string ``str(i)``, so a sequence of ids round-trips through CTranslate2 as
    ``[str(i) for i in ids]`` and back with ``int(token)``.
    """
    if not isinstance(size, int) or size < len(SPECIAL_TOKENS):
        raise ValueError(f"size must be an int >= {len(SPECIAL_TOKENS)}, got {size!r}")
    return [*SPECIAL_TOKENS, *(str(i) for i in range(len(SPECIAL_TOKENS), size))]


def _ct2():
    try:
        import ctranslate2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "to_ctranslate2 needs CTranslate2: pip install -e '.[ctranslate2]' from the repository root, or pip install ctranslate2"
        ) from error
    return ctranslate2


def _np(x) -> np.ndarray:
    # A writable copy: CTranslate2 quantizes the arrays in place.
    return np.array(x, dtype=np.float32, order="C")


def _linear(spec, kernel, bias, in_dims: int = 1):
    """Flax ``[in..., out...]`` kernel -> CTranslate2 ``[out, in]`` weight."""
    kernel = _np(kernel)
    fan_in = int(np.prod(kernel.shape[:in_dims]))
    spec.weight = _np(kernel.reshape(fan_in, -1).T)
    if bias is not None:
        spec.bias = _np(bias).reshape(-1)


def _dense(spec, params: Mapping, in_dims: int = 1):
    _linear(spec, params["kernel"], params.get("bias"), in_dims)


def _norm(spec, params: Mapping):
    spec.gamma = _np(params["scale"])
    spec.beta = _np(params["bias"])


def _self_attention(spec, params: Mapping, norm: Mapping, relative: bool):
    _norm(spec.layer_norm, norm)
    _dense(spec.linear[0], params["qkv"])  # [D, 3, N, H] -> [3D, D]
    _dense(spec.linear[1], params["out"], in_dims=2)  # [N, H, D] -> [D, D]
    if relative:
        spec.relative_position_keys = _np(params["relative_keys"])
        spec.relative_position_values = _np(params["relative_values"])


def _cross_attention(spec, params: Mapping, norm: Mapping):
    _norm(spec.layer_norm, norm)
    _dense(spec.linear[0], params["query"])  # [D, N, H] -> [D, D]
    _dense(spec.linear[1], params["kv"])  # [D, 2, N, H] -> [2D, D]
    _dense(spec.linear[2], params["out"], in_dims=2)


def _ffn(spec, params: Mapping, norm: Mapping):
    _norm(spec.layer_norm, norm)
    _dense(spec.linear_0, params["inner"])
    _dense(spec.linear_1, params["outer"])


def _inputs(spec, embedding: Mapping, config: TransformerConfig):
    # The encoder spec holds a list of embeddings (one per source feature), the decoder just one.
    tables = spec.embeddings if isinstance(spec.embeddings, list) else [spec.embeddings]
    for table in tables:
        table.weight = _np(embedding["embedding"])
    if not config.relative:
        spec.position_encodings.encodings = sinusoidal_table(config.max_len, config.d_model)


def _check_vocab(name: str, vocab: Sequence[str], size: int):
    if isinstance(vocab, str) or not all(isinstance(t, str) for t in vocab):
        raise TypeError(f"{name} must be a list of token strings")
    if len(vocab) != size:
        raise ValueError(f"{name} has {len(vocab)} tokens but the model's vocabulary has {size}")
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"{name} has duplicate tokens")
    if size < len(SPECIAL_TOKENS):
        raise ValueError(f"{name} needs ids 0..3 for pad, bos, eos, unk")


def build_spec(
    config: TransformerConfig,
    params: Mapping[str, Any],
    source_vocab: Sequence[str],
    target_vocab: Sequence[str],
):
    """The ``ctranslate2.specs.TransformerSpec`` of a jaxformer encoder-decoder, weights filled in."""
    specs = _ct2().specs
    _check_model(config, params, source_vocab, target_vocab)
    stack = dict(pre_norm=config.pre_norm, relative_position=config.relative)
    encoder = specs.TransformerEncoderSpec(config.num_encoder_layers, config.num_heads, **stack)
    decoder = specs.TransformerDecoderSpec(config.num_decoder_layers, config.num_heads, **stack)
    spec = specs.TransformerSpec(encoder, decoder)
    _set_model_config(spec.config, target_vocab)
    _fill_encoder(encoder, params, config)
    _fill_decoder(decoder, params, config)
    spec.register_source_vocabulary(list(source_vocab))
    spec.register_target_vocabulary(list(target_vocab))
    return spec


def _check_model(
    config: TransformerConfig,
    params: Mapping[str, Any],
    source_vocab: Sequence[str],
    target_vocab: Sequence[str],
):
    """Raise if CTranslate2 cannot represent the model, or the vocabularies do not fit it."""
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"model_config must be a TransformerConfig, got {type(config).__name__}")
    if config.num_encoder_layers < 1:
        raise ValueError("model_config: CTranslate2 needs an encoder (num_encoder_layers >= 1)")
    _check_vocab("source_vocab", source_vocab, config.source_vocab_size)
    _check_vocab("target_vocab", target_vocab, config.vocab_size)
    if config.pad_id != 0:
        raise ValueError(f"model_config.pad_id must be 0 for CTranslate2, got {config.pad_id}")
    _refuse_options(config)
    for part in ("encoder", "decoder", "target_embedding"):
        if part not in params:
            raise ValueError(f"params has no {part!r}: is it a jaxformer Transformer's params?")


# Options of TransformerConfig that this exporter does not write: each must keep jaxformer's default
# (the values resolved, so that e.g. positions="sinusoidal" without relative positions is accepted).
_DEFAULT_OPTIONS = {
    "layer_norm_epsilon": lambda c: c.layer_norm_epsilon == LAYER_NORM_EPSILON,
    "norm": lambda c: c.norm == "layer",
    "final_norm": lambda c: c.has_final_norm == c.pre_norm,
    "activation": lambda c: c.activation == "relu",
    "positions": lambda c: c.absolute_positions == ("none" if c.relative else "sinusoidal"),
    "position_layout": lambda c: (
        c.absolute_positions != "sinusoidal" or c.position_layout == "interleaved"
    ),
    "position_rate_denominator": lambda c: (
        c.absolute_positions != "sinusoidal" or c.position_rate_denominator == "D/2"
    ),
    "position_offset": lambda c: c.position_offset == 0,
    "embedding_scale": lambda c: c.embedding_scale is None,
    "embedding_norm": lambda c: not c.embedding_norm,
    "final_logits_bias": lambda c: not c.final_logits_bias,
    "output_bias": lambda c: c.has_output_bias == (not c.share_output_embeddings),
    "tied_output_scale": lambda c: not c.tied_output_scale,
    "attention_head_dim": lambda c: c.head_dim * c.num_heads == c.d_model,
    "query_scaling": lambda c: c.query_scaling,
    "attention_bias": lambda c: c.attention_bias,
    "ffn_bias": lambda c: c.ffn_bias,
    "relative_attention_num_buckets": lambda c: c.relative_attention_num_buckets == 0,
    "num_kv_heads": lambda c: c.kv_heads == c.num_heads,
    "sliding_window": lambda c: c.sliding_window is None,
    "attention_out_bias": lambda c: c.has_attention_out_bias,
}


def _refuse_options(config: TransformerConfig):
    """Raise naming the first model option that the export cannot express."""
    for name, is_default in _DEFAULT_OPTIONS.items():
        if not is_default(config):
            raise ValueError(
                f"model_config.{name}={getattr(config, name)!r}: the CTranslate2 export writes "
                f"jaxformer's default for this option only"
            )


def _set_model_config(model_config, target_vocab: Sequence[str]):
    """CTranslate2's ``config.json``: the layer norm epsilon and the strings of ids 1..3."""
    model_config.layer_norm_epsilon = LAYER_NORM_EPSILON
    model_config.unk_token = target_vocab[3]
    model_config.bos_token = target_vocab[1]
    model_config.eos_token = target_vocab[2]
    model_config.decoder_start_token = target_vocab[1]


def _fill_encoder(encoder, params: Mapping[str, Any], config: TransformerConfig):
    """Embeddings, layers (self-attention, FFN) and, in pre-norm, the final layer norm."""
    source_embedding = params["target_embedding" if config.share_embeddings else "source_embedding"]
    _inputs(encoder, source_embedding, config)
    enc = params["encoder"]
    for i, layer in enumerate(encoder.layer):
        p = enc[f"layer_{i}"]
        _self_attention(
            layer.self_attention, p["self_attention"], p["norm_attention"], config.relative
        )
        _ffn(layer.ffn, p["ffn"], p["norm_ffn"])
    if config.pre_norm:
        _norm(encoder.layer_norm, enc["final_norm"])


def _fill_decoder(decoder, params: Mapping[str, Any], config: TransformerConfig):
    """Embeddings, layers (self-attention, memory attention, FFN), final layer norm, projection."""
    _inputs(decoder, params["target_embedding"], config)
    dec = params["decoder"]
    for i, layer in enumerate(decoder.layer):
        p = dec[f"layer_{i}"]
        _self_attention(layer.self_attention, p["self_attention"], p["norm_self"], config.relative)
        _cross_attention(layer.attention, p["memory_attention"], p["norm_memory"])
        _ffn(layer.ffn, p["ffn"], p["norm_ffn"])
    if config.pre_norm:
        _norm(decoder.layer_norm, dec["final_norm"])
    if config.share_output_embeddings:
        decoder.projection.weight = _np(params["target_embedding"]["embedding"])  # [V, D]
    else:
        _dense(decoder.projection, params["output"])


def to_ctranslate2(
    model_config: TransformerConfig,
    params,
    output_dir,
    *,
    source_vocab: list[str],
    target_vocab: list[str],
    quantization: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write ``params`` of a ``Transformer(model_config)`` as a CTranslate2 model in ``output_dir``.

    ``source_vocab`` / ``target_vocab``: the token string of every id (``ids_vocab(n)`` when there are
    none); ids 0..3 must be pad, bos, eos, unk. ``quantization``: CTranslate2's weight type
    (``"int8"``, ``"float16"``, ...; None keeps float32). Returns the directory; load it with
    ``ctranslate2.Translator(str(path))``.

    Nothing that this call did not make is deleted: ``output_dir`` must not exist or be empty,
    unless ``overwrite`` and it holds an earlier export and nothing else (``previous_export``),
    which is then replaced. The model is written into a new directory beside it first and moved
    into place once complete, so a failed export leaves ``output_dir`` as it was.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    out = pathlib.Path(output_dir)
    previous = previous_export(out, overwrite)
    spec = build_spec(model_config, params, source_vocab, target_vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _spec_converter(spec).convert(str(staging / "model"), quantization=quantization)
        if out.exists():  # empty, or (checked above) an earlier export: only its files go
            for name in previous:
                (out / name).unlink()
            out.rmdir()
        (staging / "model").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# What CTranslate2's converters write into a model directory (any of them).
EXPORT_FILES = frozenset(
    {
        "model.bin",
        "config.json",
        "shared_vocabulary.json",
        "shared_vocabulary.txt",
        "source_vocabulary.json",
        "source_vocabulary.txt",
        "target_vocabulary.json",
        "target_vocabulary.txt",
        "vocabulary.json",
        "vocabulary.txt",
    }
)


def previous_export(out: pathlib.Path, overwrite: bool) -> list[str]:
    """The files an export to ``out`` would replace (none if ``out`` is missing or empty); raises
    unless ``overwrite`` and ``out`` holds a CTranslate2 model and nothing else."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose a new directory")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return []
    foreign = [n for n in names if n not in EXPORT_FILES or not (out / n).is_file()]
    if foreign or "model.bin" not in names:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{out} is not empty and is not an earlier CTranslate2 export "
            f"({'it holds ' + shown if foreign else 'it has no model.bin'}); nothing is deleted: "
            "choose a new directory"
        )
    if not overwrite:
        raise ValueError(
            f"{out} holds an earlier CTranslate2 export ({', '.join(names)}); pass "
            "overwrite=True (--overwrite) to replace it, or choose a new directory"
        )
    return names


def _spec_converter(spec):
    """A CTranslate2 ``Converter`` whose model is an already built specification."""
    converters = _ct2().converters

    class SpecConverter(converters.Converter):
        def _load(self):
            return spec

    return SpecConverter()
