"""Hugging Face model directories: ``config.json`` + ``*.safetensors`` (+ tokenizer files), any family.

What every family shares lives here: reading the directory (the config, the generation config, the
tensors of ``model.safetensors`` or of the shards ``model.safetensors.index.json`` lists, read one
at a time), the special ids, the generation defaults, the tokenizers, and ``load``, which builds a
``Pretrained`` from a family module (``families/*.py``, chosen by ``registry.py`` from
``model_type``). No torch and no transformers at run time.

A family module has:

- ``MODEL``: the jaxformer model class (``Transformer`` for translation models, ``DecoderOnlyLM``);
- ``config(cfg: ConfigFile, max_len) -> TransformerConfig``: config.json's fields as jaxformer's
  options; a field that changes the computation and is not implemented is refused by name
  (``cfg.refuse``), never ignored;
- ``table(c, tensors) -> {parameter path: rule}``: the tensor names (``weights.py``);
- ``IGNORED``: patterns of stored tensors that are derived, not parameters (buffers).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxformer.interop.files import SafetensorsFile, read_json_object
from jaxformer.interop.pretrained import GenerationDefaults, Pretrained
from jaxformer.interop.weights import (
    CheckpointError,
    Tensors,
    assemble,
    expected_shapes,
    to_device,
)
from jaxformer.models.decoder_only import DecoderOnlyLM

HINTS = ("max_len", "dtype")
# Hugging Face activation names (``activation_function``, ``hidden_act``) -> jaxformer's.
ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "swish": "silu",
    "silu": "silu",
}


@dataclasses.dataclass
class ConfigFile:
    """``config.json``'s fields, read with errors that name the file and the field."""

    raw: dict[str, Any]
    path: Path
    model_type: str  # as the registry knows it (``m2m_100`` is ``m2m100``)

    def get(self, name: str, default: Any = None) -> Any:
        value = self.raw.get(name)
        return default if value is None else value

    def need(self, *names: str) -> Any:
        """The first of ``names`` (a field and its older spellings) that is set."""
        for name in names:
            if self.raw.get(name) is not None:
                return self.raw[name]
        raise CheckpointError(f"{self.path}: config.json has no {names[0]!r}")

    def refuse(self, name: str, why: str, allowed: tuple = (None, False)) -> None:
        """Refuse the checkpoint if field ``name`` is set to something else than ``allowed``
        (absent counts as None): a computation jaxformer does not implement."""
        value = self.raw.get(name)
        if value not in allowed:
            raise CheckpointError(
                f"{self.path}: {name}={value!r} is not supported: {why}; jaxformer would "
                "compute another model"
            )

    def same(self, a: str, b: str) -> Any:
        if self.raw.get(b) is not None and self.raw[b] != self.raw[a]:
            raise CheckpointError(
                f"{self.path}: {a}={self.raw[a]} differs from {b}={self.raw[b]}; jaxformer needs "
                "the encoder and the decoder to have the same width"
            )
        return self.need(a)

    def activation(self, name: str, field: str) -> str:
        if name not in ACTIVATIONS:
            raise CheckpointError(
                f"{self.path}: {field}={name!r} is not supported; jaxformer has {sorted(ACTIVATIONS)}"
            )
        return ACTIVATIONS[name]

    def max_len(self, positions: int, hint: int | None) -> int:
        return positions if hint is None else min(hint, positions)


def read_config(directory: Path, aliases: dict[str, str]) -> ConfigFile:
    path = directory / "config.json"
    raw = read_json_object(path)
    model_type = raw.get("model_type")
    if raw.get("quantization_config") is not None:
        method = (raw["quantization_config"] or {}).get("quant_method", "?")
        raise CheckpointError(
            f"{path}: quantization_config ({method}) is not supported: jaxformer reads "
            "float32, bfloat16 and float16 weights"
        )
    return ConfigFile(raw, path, aliases.get(model_type, model_type))


def read_generation_config(directory: Path) -> dict[str, Any]:
    return read_json_object(directory / "generation_config.json", missing={})


def read_tensors(directory: Path) -> Tensors:
    """The tensors of ``model.safetensors`` or of the shards its index lists (headers read now,
    each tensor when it is taken)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f'{index}: no "weight_map" of tensor names to files')
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(p.name for p in directory.glob("*.safetensors"))
    if not names:
        found = sorted(p.name for p in directory.iterdir())
        torch_files = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (
            f" (it has {torch_files}: PyTorch pickles, which jaxformer does not read; convert them "
            "once with `safetensors.torch.save_file` or transformers' `save_pretrained`)"
            if torch_files
            else ""
        )
        raise CheckpointError(f"{directory}: no *.safetensors weights{hint}")
    files: dict[str, SafetensorsFile] = {}
    for name in names:
        if not (directory / name).exists():
            raise CheckpointError(f"{index}: lists {name}, which is missing from {directory}")
        file = SafetensorsFile(directory / name)
        for key in file.entries:
            files[key] = file
    shapes = {key: file.shape(key) for key, file in files.items()}
    where = lambda key: (
        str(files[key].path) if key in files else ", ".join(str(directory / n) for n in names)
    )
    return Tensors(
        shapes, lambda key: files[key].read(key), where, f"the Hugging Face model in {directory}"
    )


def load(
    directory: Path, family, cfg: ConfigFile, *, param_dtype: str = "float32",
    place=to_device, **hints,
) -> Pretrained:  # fmt: skip
    """A Hugging Face directory of ``family`` (a ``families/*.py`` module) as a ``Pretrained``."""
    from jaxformer.interop import hf_tokenizers

    try:
        config = family.config(cfg, hints.get("max_len"))
        # Activations follow the parameters' dtype unless the dtype hint says otherwise:
        # param_dtype="bfloat16" is bfloat16 end to end, no float32 copy of a weight ever made.
        dtype = hints.get("dtype", param_dtype)
        if dtype != config.dtype:
            config = config.replace(dtype=dtype)
    except CheckpointError:
        raise
    except ValueError as error:  # TransformerConfig's own checks (rope_scaling's keys, ...)
        raise CheckpointError(f"{cfg.path}: {error}") from None
    generation = read_generation_config(directory)
    language_model = family.MODEL is DecoderOnlyLM
    if language_model:
        ids = causal_lm_ids(cfg, generation, config.vocab_size)
        config = config.replace(pad_id=ids["pad"])  # ragged prompts are padded with it
    else:
        ids = seq2seq_ids(cfg, generation)
    model = family.MODEL(config)
    tensors = read_tensors(directory)
    params = assemble(
        family.table(config, tensors), tensors, expected_shapes(model),
        ignored=getattr(family, "IGNORED", ()), param_dtype=param_dtype, place=place,
    )  # fmt: skip
    if language_model:
        source = target = hf_tokenizers.causal_lm(directory, ids, config.vocab_size)
    else:
        rows = (config.source_vocab_size, config.vocab_size)
        raw = {**cfg.raw, "model_type": cfg.model_type}
        source, target = hf_tokenizers.load(directory, raw, ids, rows)
    return Pretrained(
        model=model,
        params=params,
        start_id=ids["start"],
        end_id=ids["end"],
        pad_id=ids["pad"],
        source_tokenizer=source,
        target_tokenizer=target,
        family=cfg.model_type,
        path=directory,
        generation=generation_defaults(cfg.raw, generation, language_model),
        task_prefixes=_task_prefixes(cfg.raw),
    )


def _task_prefixes(config: dict) -> dict[str, str]:
    """``{task: prefix}`` from config.json's ``task_specific_params`` (T5 declares its tasks)."""
    tasks = config.get("task_specific_params") or {}
    if not isinstance(tasks, dict):
        return {}
    return {
        task: settings["prefix"]
        for task, settings in tasks.items()
        if isinstance(settings, dict) and isinstance(settings.get("prefix"), str)
    }


def _setting(cfg: ConfigFile, generation: dict, name: str):
    """generation_config.json's value of ``name``, else config.json's (transformers' order)."""
    value = generation.get(name)
    return cfg.raw.get(name) if value is None else value


def seq2seq_ids(cfg: ConfigFile, generation: dict) -> dict[str, int]:
    """A translation model's decoder start, EOS (the first where several are listed) and pad."""

    def pick(name: str) -> int:
        value = _setting(cfg, generation, name)
        if isinstance(value, list):  # several EOS ids: the first is the one models emit
            value = value[0]
        if not isinstance(value, int):
            raise CheckpointError(f"{cfg.path.parent}: config.json has no integer {name!r}")
        return value

    return {
        "start": pick("decoder_start_token_id"),
        "end": pick("eos_token_id"),
        "pad": pick("pad_token_id"),
    }


def causal_lm_ids(cfg: ConfigFile, generation: dict, vocab: int) -> dict[str, Any]:
    """A language model's BOS (None if it declares none), EOS (an int, or a tuple when several
    end a text: Llama 3's three) and padding (its own, else the first EOS: padding is masked, so
    any id in the vocabulary does)."""

    def check(name: str, value):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab:
            raise CheckpointError(
                f"{cfg.path}: {name}={value!r} is not a token id of the model's {vocab}"
            )
        return value

    bos = _setting(cfg, generation, "bos_token_id")
    eos = _setting(cfg, generation, "eos_token_id")
    if eos is None or eos == []:
        raise CheckpointError(
            f"{cfg.path}: no eos_token_id in config.json nor generation_config.json"
        )
    ends = tuple(
        dict.fromkeys(check("eos_token_id", e) for e in (eos if isinstance(eos, list) else [eos]))
    )
    pad = _setting(cfg, generation, "pad_token_id")
    return {
        "start": None if bos is None else check("bos_token_id", bos),
        "end": ends[0] if len(ends) == 1 else ends,
        "pad": ends[0] if pad is None else check("pad_token_id", pad),
    }


def generation_defaults(
    config: dict, generation: dict, language_model: bool = False
) -> GenerationDefaults:
    """What generation_config.json (over config.json) changes in the outputs, as jaxformer's
    defaults, and the list of settings it does not reproduce (``GenerationDefaults.ignored``)."""
    merged = {**config, **generation}
    suppress, ignored = [], []
    for words in merged.get("bad_words_ids") or []:
        if len(words) == 1:
            suppress.append(int(words[0]))
        else:
            ignored.append(f"bad_words_ids {words} (sequences of several tokens are not supported)")
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if merged.get(name):
            ignored.append(f"{name}={merged[name]} (not supported)")
    if merged.get("encoder_no_repeat_ngram_size"):
        size = merged["encoder_no_repeat_ngram_size"]
        ignored.append(f"encoder_no_repeat_ngram_size={size} (not supported)")
    if merged.get("forced_eos_token_id") is not None:
        ignored.append(
            "forced_eos_token_id (a hypothesis that reaches max_length ends without EOS and is "
            "reported as truncated)"
        )
    if merged.get("length_penalty", 1.0) != 1.0 or merged.get("num_beams", 1) > 1:
        ignored.append(
            f"length_penalty={merged.get('length_penalty', 1.0)} (Hugging Face divides by "
            "length**alpha; jaxformer's length_penalty is GNMT's, pass it yourself)"
        )
    forced = merged.get("forced_bos_token_id")
    defaults = GenerationDefaults(
        suppress_ids=tuple(sorted(set(suppress))),
        forced_first_id=None if forced is None else int(forced),
        max_length=merged.get("max_length"),
        ignored=tuple(ignored),
        repetition_penalty=float(merged.get("repetition_penalty") or 1.0),
        no_repeat_ngram_size=int(merged.get("no_repeat_ngram_size") or 0),
    )
    return _language_model_defaults(merged, defaults) if language_model else defaults


def _language_model_defaults(merged: dict, defaults: GenerationDefaults) -> GenerationDefaults:
    """A language model's lengths count new tokens (``max_new_tokens``; Hugging Face's
    ``max_length`` counts the prompt too) and its sampling settings become defaults."""
    ignored = list(defaults.ignored)
    max_length = merged.get("max_new_tokens")
    if max_length is None and merged.get("max_length") is not None:
        max_length = merged["max_length"]
        ignored.append(
            f"max_length={max_length} counts the prompt in Hugging Face; jaxformer's max_length "
            "counts new tokens, and this is used as such"
        )
    min_length = merged.get("min_new_tokens") or 0
    if merged.get("min_length"):
        ignored.append(f"min_length={merged['min_length']} (counts the prompt; not supported)")
    for name, neutral in (
        ("min_p", None),
        ("typical_p", 1.0),
        ("epsilon_cutoff", 0.0),
        ("eta_cutoff", 0.0),
    ):
        if merged.get(name, neutral) not in (neutral, None):
            ignored.append(f"{name}={merged[name]} (not supported)")
    sampling = None
    if merged.get("do_sample"):
        top_k = merged.get("top_k", 50)  # transformers' default when sampling
        sampling = {
            "sampling_topk": 0 if top_k is None else int(top_k),
            "sampling_temperature": float(merged.get("temperature") or 1.0),
            "top_p": float(merged.get("top_p") or 1.0),
        }
    return dataclasses.replace(
        defaults, max_length=max_length, min_length=int(min_length), sampling=sampling,
        ignored=tuple(ignored),
    )  # fmt: skip
