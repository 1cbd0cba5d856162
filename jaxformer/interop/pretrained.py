"""What ``load_pretrained`` returns: ``Pretrained`` (a model, its parameters, its special ids, tokenizers
and generation defaults), with text in, text out on top. It imports no importer: the importers
(``huggingface.py``, ``opennmt_tf.py``, ``families/``) build it, and ``registry.py`` chooses them.

    pre = jaxformer.load_pretrained("opus-mt-en-de")      # a Hugging Face directory
    pre.translate(["Hello world"])[0].texts[0]
    lm = jaxformer.load_pretrained("Llama-3.2-1B")        # a decoder-only checkpoint
    lm.generate(["The capital of France is"])[0].texts[0]
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from jaxformer.models.config import TransformerConfig
from jaxformer.models.decoder_only import DecoderOnlyLM
from jaxformer.models.encoder_decoder import Transformer


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint's generation settings change in the outputs, as jaxformer's options.

    ``suppress_ids``: tokens never generated (Hugging Face ``bad_words_ids`` of single tokens:
    Marian's ``<pad>``). ``forced_first_id``: a token forced right after the start token (BART's
    ``forced_bos_token_id``); NLLB's target language is chosen per call instead. ``max_length``:
    the checkpoint's default, for text-level callers (language models: new tokens, Hugging Face's
    ``max_new_tokens``). ``min_length``: new tokens before EOS may end (``min_new_tokens``).
    ``sampling``: ``DecodeOptions`` fields (``sampling_topk``, ``sampling_temperature``,
    ``top_p``) when the checkpoint samples by default (``do_sample``; transformers' top-k of 50
    when it names none), else None (greedy). ``repetition_penalty``, ``no_repeat_ngram_size``:
    Hugging Face's, applied by default. ``ignored``: settings that jaxformer does not reproduce,
    each with the reason (callers show them).
    """

    suppress_ids: tuple[int, ...] = ()
    forced_first_id: int | None = None
    max_length: int | None = None
    ignored: tuple[str, ...] = ()
    min_length: int = 0
    sampling: dict[str, Any] | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def repetition(self) -> dict[str, Any]:
        """``DecodeOptions`` fields of the checkpoint's repetition settings (none if neutral)."""
        out: dict[str, Any] = {}
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            out["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """A loaded checkpoint: ``model.apply({"params": params}, src_ids, tgt_in_ids)`` gives logits
    (a translation model), ``model.apply({"params": params}, ids)`` (a decoder-only LM).

    Special ids. A translation model: ``start_id`` starts the decoder, ``end_id`` is EOS,
    sources are right-padded with ``pad_id``. A language model (``is_language_model``): its
    tokenizer puts BOS first where the checkpoint says so, and ``start_id`` is that BOS (None
    if the checkpoint declares none; ``generate`` starts from each prompt's last token, not
    from it); ``end_id`` is its EOS, or a tuple of ids when it lists several (Llama 3 ends on
    any of three): any of them ends a hypothesis; ``pad_id`` is the checkpoint's padding id,
    else its (first) EOS: ragged prompts are right-padded with it and the padding is masked,
    so its value never changes a result. An LM's prompts and outputs share one tokenizer:
    ``source_tokenizer is target_tokenizer``.
    """

    model: Transformer | DecoderOnlyLM
    params: Any
    start_id: int | None  # the decoder's first input token; an LM's BOS (or None)
    end_id: int | tuple[int, ...]  # EOS: one id, or several that each end a hypothesis
    pad_id: int  # sources (prompts) are right-padded with it
    source_tokenizer: Any | None
    target_tokenizer: Any | None
    # "marian", "m2m100", "bart", "mbart", "t5", "mt5", "opennmt-tf"; "gpt2", "llama",
    # "mistral", "qwen2", "gemma"
    family: str
    path: Path
    generation: GenerationDefaults = GenerationDefaults()
    # Source prefixes the checkpoint declares, by task (config.json's task_specific_params: T5's
    # {"translation_en_to_de": "translate English to German: ", ...}); empty if none.
    task_prefixes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    @property
    def is_language_model(self) -> bool:
        """A decoder-only LM (``generate``), not a translation model (``translate``)."""
        return isinstance(self.model, DecoderOnlyLM)

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
        (a path: ``interop.opennmt_config``); ``options`` (``beam_size=4``, ...) win over both.

        A language model: ``max_length`` counts new tokens (``max_new_tokens``, 256 if none,
        within the positions), ``min_length`` too (``min_new_tokens``); a checkpoint that samples
        by default (``do_sample``) brings its ``sampling_topk``, ``sampling_temperature`` and
        ``top_p`` unless ``options`` choose the search (``beam_size``, ``sampling_topk``,
        ``sampling_temperature`` or ``top_p`` given)."""
        from jaxformer.decoding.texts import DecodeOptions

        if self.is_language_model:
            return self._lm_options(target_lang, onmt_config, options)
        if onmt_config is not None:
            from jaxformer.interop.opennmt_config import read_opennmt_config

            options = {**read_opennmt_config(onmt_config).decoding, **options}
        defaults = {"suppress_ids": self.generation.suppress_ids, **self.generation.repetition()}
        if target_lang is not None:
            if self.target_tokenizer is None or not hasattr(self.target_tokenizer, "token_id"):
                raise ValueError(f"target_lang={target_lang!r}: this model has no language tokens")
            defaults["target_prefix"] = (self.target_tokenizer.token_id(target_lang),)
        elif self.generation.forced_first_id is not None:
            defaults["target_prefix"] = (self.generation.forced_first_id,)
        limit = self.config.max_len
        defaults["max_length"] = min(self.generation.max_length or 256, limit)
        return DecodeOptions(**{**defaults, **options})

    def _lm_options(self, target_lang, onmt_config, options: dict):
        from jaxformer.decoding.texts import DecodeOptions

        if target_lang is not None:
            raise ValueError(f"target_lang={target_lang!r}: {self._lm_name}, without languages")
        if onmt_config is not None:
            raise ValueError(
                f"onmt_config: {self._lm_name}; OpenNMT-tf run configurations are for its "
                "translation models"
            )
        defaults: dict[str, Any] = {
            "suppress_ids": self.generation.suppress_ids,
            "max_length": min(self.generation.max_length or 256, self.config.max_len - 1),
            "min_length": self.generation.min_length,
            **self.generation.repetition(),
        }
        chooses = {"beam_size", "sampling_topk", "sampling_temperature", "top_p"} & set(options)
        if self.generation.sampling and not chooses:
            defaults |= self.generation.sampling
        return DecodeOptions(**{**defaults, **options})

    @property
    def _lm_name(self) -> str:
        return f"{self.path.name} is a decoder-only language model ({self.family})"

    def generate(
        self,
        prompts,
        options=None,
        *,
        return_prompt: bool = False,
        batch_size: int = 32,
        window: int | None = None,
    ):
        """Text in, text out for a language model: the continuation of each prompt, a
        ``decoding.texts.Output`` per prompt (``texts``: the n-best, best first; ``scores``;
        ``truncated``: stopped at ``max_length`` without EOS).

        ``options``: a ``DecodeOptions`` (default: ``decode_options()``, the checkpoint's
        generation defaults; ``max_length`` counts new tokens). ``return_prompt``: False (the
        default) gives the new text only (the EOS and special tokens dropped; a continuation that
        starts a word may start with its space, as Hugging Face's ``batch_decode`` of the new
        tokens gives it); True gives the prompt and the continuation decoded together from their
        ids (so a tokenizer that joins pieces across them, sentencepiece's ``▁``, joins them as
        in one text). Each prompt is tokenized as the checkpoint's tokenizer does it (BOS first
        where it adds one); prompts of different lengths share batches without changing each
        other's results. ``iter_generate`` yields the outputs one by one, in order.
        """
        return list(
            self.iter_generate(
                prompts, options, return_prompt=return_prompt, batch_size=batch_size,
                window=window,
            )
        )  # fmt: skip

    def iter_generate(
        self,
        prompts,
        options=None,
        *,
        return_prompt: bool = False,
        batch_size: int = 32,
        window: int | None = None,
        engine_for=None,
    ):
        """``generate``, one output at a time in input order (``decoding.texts.iter_continuations``;
        static batches, or through ``engine_for``'s serving engine)."""
        from jaxformer.decoding.texts import iter_continuations

        if not self.is_language_model:
            raise ValueError(
                f"{self.path.name} is a translation model ({self.family}): use "
                "pre.translate(lines); generate continues prompts with a decoder-only language "
                "model"
            )
        if self.target_tokenizer is None:
            raise ValueError(
                f"{self.path} has no tokenizer.json; continue token ids with jaxformer.generate"
            )
        if options is None:
            options = self.decode_options()
        return iter_continuations(
            self.model, self.params, self.target_tokenizer, prompts, options,
            batch_size=batch_size, window=window, special_ids=self.special_ids,
            return_prompt=return_prompt, engine_for=engine_for,
        )  # fmt: skip

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
        if self.is_language_model:
            raise ValueError(
                f"{self._lm_name}: translate is for translation models; continue prompts with "
                "pre.generate(prompts)"
            )
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
