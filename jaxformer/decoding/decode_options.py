"""Text-level search options (``DecodeOptions``) and the special ids text decoding uses.

``DecodeOptions`` names the search's options as OpenNMT-tf's ``params`` do (``beam_size``,
``sampling_topk``, ...), checks them once (``options.py``), and turns them into ``generate``'s
arguments; ``jaxformer.decoding.texts`` decodes text with them.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxformer.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from jaxformer.decoding import options as opt
from jaxformer.decoding.samplers import BestSampler, RandomSampler
from jaxformer.decoding.strategies import BeamSearch, GreedySearch


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Search options, as OpenNMT-tf's ``params`` (``beam_width``, ``sampling_topk``, ...) name them.

    ``sampling_topk``: 1 is greedy / beam search (the default); 0 samples from the full
    distribution; k > 1 from the k most likely tokens, with ``sampling_temperature`` and ``top_p``
    (nucleus sampling: the smallest set of candidates holding that probability mass).
    An option that cannot apply is refused rather than ignored: ``sampling_temperature`` and
    ``top_p`` need sampling (``sampling_topk`` != 1; a temperature alone does not switch sampling
    on, as in OpenNMT-tf and CTranslate2), ``length_penalty`` and ``coverage_penalty`` need beam
    search (``beam_size`` > 1).
    ``max_length``: the most target tokens per hypothesis. A hypothesis that reaches it without EOS
    is returned as it is (``truncated`` tells how many did), as OpenNMT-tf does.
    ``target_prefix``: target token ids forced after the start token of every line (NLLB's
    target-language token), part of the output (its text and its length; its tokens add 0 to the
    scores); translation only. ``suppress_ids``: target token ids that never appear. ``generate``
    documents both; empty (the default) changes nothing. ``repetition_penalty`` (CTRL's θ, 1:
    off) and ``no_repeat_ngram_size`` (0: off) look at what a hypothesis holds, an LM's prompt
    included (``decoding/repetition.py`` has the formulas).
    """

    beam_size: int = 1
    length_penalty: float = 0.0
    coverage_penalty: float = 0.0
    sampling_topk: int = 1
    sampling_temperature: float = 1.0
    top_p: float = 1.0
    min_length: int = 0
    max_length: int = 250
    n_best: int = 1
    seed: int = 0
    target_prefix: tuple[int, ...] | list[int] = ()  # a list is stored as a tuple
    suppress_ids: tuple[int, ...] | list[int] = ()
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):  # the checks every decoding entry point shares (options.py)
        opt.require_int("beam_size", self.beam_size, 1)
        opt.require_int("sampling_topk", self.sampling_topk, 0)
        opt.require_number("sampling_temperature", self.sampling_temperature, positive=True)
        opt.check_lengths(self.max_length, self.min_length)
        opt.require_int("n_best", self.n_best, 1, self.beam_size, "beam_size")
        opt.require_number("length_penalty", self.length_penalty)
        opt.require_number("coverage_penalty", self.coverage_penalty)
        opt.require_int("seed", self.seed)
        opt.require_probability("top_p", self.top_p)
        opt.check_repetition(self.repetition_penalty, self.no_repeat_ngram_size)
        self._refuse_inapplicable()
        for name in ("target_prefix", "suppress_ids"):  # ids; checked against V by generate
            ids = getattr(self, name)
            if not isinstance(ids, tuple | list):
                raise ValueError(f"{name} must be a tuple of token ids (ints >= 0), got {ids!r}")
            ids = tuple(opt.require_int(f"{name}[{k}]", i, 0) for k, i in enumerate(ids))
            object.__setattr__(self, name, ids)  # a list becomes a (hashable) tuple
        if len(self.target_prefix) >= self.max_length:
            raise ValueError(
                f"target_prefix has {len(self.target_prefix)} tokens; it must be shorter than "
                f"max_length={self.max_length} (which counts it)"
            )

    def _refuse_inapplicable(self) -> None:
        if self.sampling_topk == 1:
            for name, neutral in (("sampling_temperature", 1.0), ("top_p", 1.0)):
                if getattr(self, name) != neutral:
                    raise ValueError(
                        f"{name}={getattr(self, name)} applies to sampling only; set sampling_topk "
                        "to 0 (the full distribution) or k > 1 (the k best), or leave it at "
                        f"{neutral} (sampling_topk=1 is greedy or beam search)"
                    )
        if self.beam_size == 1:
            for name in ("length_penalty", "coverage_penalty"):
                if getattr(self, name) != 0:
                    raise ValueError(
                        f"{name}={getattr(self, name)} applies to beam search only; set "
                        "beam_size > 1, or leave it at 0"
                    )

    @property
    def strategy(self) -> GreedySearch | BeamSearch:
        if self.beam_size == 1:
            return GreedySearch()
        return BeamSearch(
            self.beam_size,
            length_penalty=self.length_penalty,
            coverage_penalty=self.coverage_penalty,
            num_hypotheses=self.n_best,
        )

    @property
    def sampler(self) -> BestSampler | RandomSampler:
        if self.sampling_topk == 1:
            return BestSampler()
        return RandomSampler(
            topk=self.sampling_topk, temperature=self.sampling_temperature, top_p=self.top_p
        )

    def search(self, rng) -> dict:
        """``generate``'s search arguments (EOS is the tokenizers' ``EOS_ID``)."""
        return dict(
            end_id=EOS_ID,
            max_length=self.max_length,
            min_length=self.min_length,
            strategy=self.strategy,
            sampler=self.sampler,
            rng=rng,
            suppress_ids=self.suppress_ids,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )

    @property
    def rng(self) -> jax.Array | None:
        return None if self.sampling_topk == 1 else jax.random.key(self.seed)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids text-level decoding needs: jaxformer's tokenizers' by default; a loaded checkpoint's
    (``Pretrained.special_ids``) otherwise. ``unk_id`` None: the tokenizer has no unknown token."""

    start: int = BOS_ID
    end: int | tuple[int, ...] = EOS_ID  # a tuple: any of them ends a hypothesis
    pad: int = PAD_ID
    unk: int | None = UNK_ID
