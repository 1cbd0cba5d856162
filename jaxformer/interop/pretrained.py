"""``load_pretrained``: the models people already have, as a jaxformer model and its parameters.

    pre = jaxformer.load_pretrained("opus-mt-en-de")      # a Hugging Face directory
    pre = jaxformer.load_pretrained("run/", source_vocabulary="src.txt", target_vocabulary="tgt.txt",
                                    num_heads=8)          # an OpenNMT-tf V2 checkpoint directory
    result = jaxformer.generate(pre.model, pre.params, src_ids, start_id=pre.start_id,
                                end_id=pre.end_id, **pre.generation.search_arguments())

A directory with ``config.json`` is read as Hugging Face's (``huggingface.py``); a directory with a
``checkpoint`` file or ``ckpt-N.index`` files, or a checkpoint prefix, as OpenNMT-tf's
(``opennmt_tf.py``). Neither needs torch, transformers or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax

from jaxformer.interop import huggingface as hf
from jaxformer.interop.weights import CheckpointError
from jaxformer.models.config import TransformerConfig
from jaxformer.models.encoder_decoder import Transformer

HF_HINTS = ("max_len", "dtype")


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint's generation settings change in the outputs, as jaxformer's options.

    ``suppress_ids``: tokens never generated (Hugging Face ``bad_words_ids`` of single tokens:
    Marian's ``<pad>``). ``forced_first_id``: a token forced right after the start token (BART's
    ``forced_bos_token_id``); NLLB's target language is chosen per call instead. ``max_length``:
    the checkpoint's default, for text-level callers. ``ignored``: settings that
    jaxformer does not reproduce, each with the reason (callers show them).
    """

    suppress_ids: tuple[int, ...] = ()
    forced_first_id: int | None = None
    max_length: int | None = None
    ignored: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """A loaded checkpoint: ``model.apply({"params": params}, src_ids, tgt_in_ids)`` gives logits."""

    model: Transformer
    params: Any
    start_id: int  # the decoder's first input token
    end_id: int  # EOS
    pad_id: int  # sources are right-padded with it
    source_tokenizer: Any | None
    target_tokenizer: Any | None
    family: str  # "marian", "m2m100", "bart", "mbart", "t5", "mt5", "opennmt-tf"
    path: Path
    generation: GenerationDefaults = GenerationDefaults()
    # Source prefixes the checkpoint declares, by task (config.json's task_specific_params: T5's
    # {"translation_en_to_de": "translate English to German: ", ...}); empty if none.
    task_prefixes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    @property
    def special_ids(self):
        """The ids text-level decoding needs (``decoding.texts.SpecialIds``)."""
        from jaxformer.decoding.texts import SpecialIds

        return SpecialIds(self.start_id, self.end_id, self.pad_id, _unk_id(self.source_tokenizer))

    @property
    def wants_prefix(self) -> bool:
        """Whether sources need a task prefix to make sense (T5, which is trained with them)."""
        return self.family == "t5"

    def prefix_warning(self) -> str:
        """What to tell a user who translates with a T5 checkpoint without a source prefix."""
        declared = ", ".join(f"{p!r} ({task})" for task, p in self.task_prefixes.items())
        return (
            f"{self.path.name} is a T5 checkpoint: its sources need the task prefix it was trained "
            "with, or it translates garbage; "
            + (f"it declares {declared}" if declared else "config.json declares none")
            + "; pass source_prefix= / --source-prefix TEXT"
        )

    def decode_options(self, target_lang: str | None = None, onmt_config=None, **options):
        """``DecodeOptions`` with this checkpoint's generation defaults: its suppressed tokens,
        its forced first token or ``target_lang``'s token (NLLB), ``max_length`` within the model's
        positions; then the decoding settings of an OpenNMT-tf run configuration ``onmt_config``
        (a path: ``interop.opennmt_config``); ``options`` (``beam_size=4``, ...) win over both."""
        from jaxformer.decoding.texts import DecodeOptions

        if onmt_config is not None:
            from jaxformer.interop.opennmt_config import read_opennmt_config

            options = {**read_opennmt_config(onmt_config).decoding, **options}
        defaults = {"suppress_ids": self.generation.suppress_ids}
        if target_lang is not None:
            if self.target_tokenizer is None or not hasattr(self.target_tokenizer, "token_id"):
                raise ValueError(f"target_lang={target_lang!r}: this model has no language tokens")
            defaults["target_prefix"] = (self.target_tokenizer.token_id(target_lang),)
        elif self.generation.forced_first_id is not None:
            defaults["target_prefix"] = (self.generation.forced_first_id,)
        limit = self.config.max_len
        defaults["max_length"] = min(self.generation.max_length or 256, limit)
        return DecodeOptions(**{**defaults, **options})

    def translate(
        self,
        lines,
        options=None,
        *,
        source_lang: str | None = None,
        target_lang: str | None = None,
        batch_size: int = 32,
        truncate: bool = False,
        progress: bool = False,
        source_prefix: str | None = None,
    ):
        """Text in, text out with the checkpoint's tokenizers (``decoding.texts.Output`` per line).

        ``options``: a ``DecodeOptions`` (default: ``decode_options(target_lang)``). NLLB / M2M100
        need ``source_lang`` and ``target_lang`` (codes such as ``eng_Latn``). ``source_prefix``:
        text put before every line (T5's task prefix, e.g. ``translate English to German: `` from
        ``task_prefixes``; a T5 checkpoint without one warns). ``iter_translate`` yields the
        outputs one by one, in order, as they are ready.
        """
        from jaxformer.decoding.texts import translate_texts

        source, prefix = self._source(source_lang, source_prefix)
        if options is None:
            options = self.decode_options(target_lang)
        return translate_texts(
            self.model, self.params, source, self.target_tokenizer, lines, options,
            batch_size=batch_size, truncate=truncate, progress=progress,
            special_ids=self.special_ids, source_prefix=prefix,
        )  # fmt: skip

    def iter_translate(
        self,
        lines,
        options=None,
        *,
        source_lang: str | None = None,
        target_lang: str | None = None,
        batch_size: int = 32,
        truncate: bool = False,
        source_prefix: str | None = None,
        window: int | None = None,
        engine_for=None,
    ):
        """``translate``, one output at a time in input order (``decoding.texts.iter_translations``:
        lines sorted by length within windows of ``window`` lines, or through ``engine_for``'s
        serving engine)."""
        from jaxformer.decoding.texts import iter_translations

        source, prefix = self._source(source_lang, source_prefix)
        if options is None:
            options = self.decode_options(target_lang)
        return iter_translations(
            self.model, self.params, source, self.target_tokenizer, lines, options,
            batch_size=batch_size, truncate=truncate, special_ids=self.special_ids,
            source_prefix=prefix, window=window, engine_for=engine_for,
        )  # fmt: skip

    def _source(self, source_lang: str | None, source_prefix: str | None):
        """The source tokenizer for ``source_lang`` and the prefix (a T5 without one warns)."""
        if self.source_tokenizer is None or self.target_tokenizer is None:
            raise ValueError(
                f"{self.path} has no tokenizer files (an OpenNMT-tf checkpoint needs "
                "source_vocabulary= and target_vocabulary=); or decode token ids with "
                "jaxformer.generate"
            )
        source = self.source_tokenizer
        if source_lang is not None:
            if not hasattr(source, "for_language"):
                raise ValueError(f"source_lang={source_lang!r}: this model has no language tokens")
            source = source.for_language(source_lang)
        if source_prefix is None and self.wants_prefix:
            warnings.warn(self.prefix_warning(), UserWarning, stacklevel=3)
        return source, source_prefix or ""


def _unk_id(tokenizer) -> int | None:
    return None if tokenizer is None else getattr(tokenizer, "unk_id", None)


def load_pretrained(path: str | Path, **hints) -> Pretrained:
    """A Hugging Face model directory or an OpenNMT-tf checkpoint, loaded without its framework.

    Hints (Hugging Face): ``max_len`` (longest sequence; T5 has no position table, 1024 by default),
    ``dtype`` (activations: "float32", "bfloat16"; parameters stay float32). OpenNMT-tf: see
    ``opennmt_tf.load``.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return _load_huggingface(path, **hints)
    from jaxformer.interop import opennmt_tf

    if opennmt_tf.is_checkpoint(path):
        return opennmt_tf.load(path, **hints)
    if not path.exists():
        raise FileNotFoundError(f"load_pretrained: {path} does not exist")
    raise CheckpointError(
        f"load_pretrained: {path} is neither a Hugging Face model directory (config.json with "
        "*.safetensors) nor an OpenNMT-tf checkpoint (a directory with a `checkpoint` file or "
        "ckpt-N.index files, or a checkpoint prefix such as run/ckpt-5000)"
    )


def check_hints(hints: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(hints) - set(allowed))
    if unknown:
        raise TypeError(
            f"load_pretrained: unknown hint(s) {unknown} for {what}; allowed: {allowed}"
        )


def shapes_of(model: Transformer) -> dict:
    """The parameter tree the model expects, as shapes (nothing is computed)."""
    from jaxformer.models.params import init_params

    return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))


def _load_huggingface(directory: Path, **hints) -> Pretrained:
    check_hints(hints, HF_HINTS, "a Hugging Face model")
    raw = hf.read_config(directory)
    config = hf.to_config(raw, str(directory / "config.json"), hints.get("max_len"))
    if "dtype" in hints:
        config = config.replace(dtype=hints["dtype"])
    model = Transformer(config)
    tensors = hf.read_tensors(directory)
    params = hf.to_params(tensors, config, raw["model_type"], shapes_of(model))
    generation = hf.read_generation_config(directory)
    ids = _special_ids(raw, generation, directory)
    from jaxformer.interop import hf_tokenizers

    rows = (config.source_vocab_size, config.vocab_size)
    source, target = hf_tokenizers.load(directory, raw, ids, rows)
    return Pretrained(
        model=model,
        params=jax.tree_util.tree_map(jax.numpy.asarray, params),
        start_id=ids["start"],
        end_id=ids["end"],
        pad_id=ids["pad"],
        source_tokenizer=source,
        target_tokenizer=target,
        family=raw["model_type"],
        path=directory,
        generation=_generation_defaults(raw, generation, ids),
        task_prefixes=_task_prefixes(raw),
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


def _special_ids(config: dict, generation: dict, directory: Path) -> dict[str, int]:
    def pick(name: str) -> int:
        value = generation.get(name, config.get(name))
        if isinstance(value, list):  # several EOS ids: the first is the one models emit
            value = value[0]
        if not isinstance(value, int):
            raise CheckpointError(f"{directory}: config.json has no integer {name!r}")
        return value

    return {
        "start": pick("decoder_start_token_id"),
        "end": pick("eos_token_id"),
        "pad": pick("pad_token_id"),
    }


def _generation_defaults(config: dict, generation: dict, ids: dict) -> GenerationDefaults:
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
    for name in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
        if merged.get(name):
            ignored.append(f"{name}={merged[name]} (not supported)")
    if merged.get("repetition_penalty", 1.0) != 1.0:
        ignored.append(f"repetition_penalty={merged['repetition_penalty']} (not supported)")
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
    return GenerationDefaults(
        suppress_ids=tuple(sorted(set(suppress))),
        forced_first_id=None if forced is None else int(forced),
        max_length=merged.get("max_length"),
        ignored=tuple(ignored),
    )
