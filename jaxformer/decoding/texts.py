"""Text in, text out: translate lines batched by length, continue prompts, score with BLEU.

    options = DecodeOptions(beam_size=4, length_penalty=0.6)
    outputs = translate_texts(model, params, src_tok, tgt_tok, lines, options)
    outputs[i].texts[0]                         # the best hypothesis of line i; .scores alongside
    corpus_scores([o.texts[0] for o in outputs], references)   # {"bleu": ..., "exact_match": ...}

Lines are sorted by length and cut into batches of ``batch_size`` whose source length is rounded up
to a multiple of ``length_step``, and the last batch is filled with empty rows: a file of any size
compiles only a handful of shapes (one per length bucket), and results come back in input order.
Decoding a row does not depend on the other rows of its batch.

Sources are token ids without BOS or EOS, right-padded with ``PAD_ID`` (0), as ``encode_sources``
and ``length_batches`` make them. A symbol the source tokenizer does not know becomes ``UNK_ID``:
``Output.unknown`` lists such symbols per line (``unknown_summary`` words a warning), so a caller
can tell the user rather than return a translation of ``<unk>`` without a word.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxformer.data.tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    out_of_vocabulary,
)
from jaxformer.decoding import BeamSearch, BestSampler, GreedySearch, RandomSampler
from jaxformer.decoding import options as opt
from jaxformer.decoding.generation import generate


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Search options, as OpenNMT-tf's ``params`` (``beam_width``, ``sampling_topk``, ...) name them.

    ``sampling_topk``: 1 is greedy / beam search (the default); 0 samples from the full
    distribution; k > 1 from the k most likely tokens, with ``sampling_temperature``.
    ``max_length``: the most target tokens per hypothesis. A hypothesis that reaches it without EOS
    is returned as it is (``truncated`` tells how many did), as OpenNMT-tf does.
    ``target_prefix``: target token ids forced after the start token of every line (NLLB's
    target-language token), part of the output (its text and its length; its tokens add 0 to the
    scores); translation only. ``suppress_ids``: target token ids that never appear. ``generate``
    documents both; empty (the default) changes nothing.
    """

    beam_size: int = 1
    length_penalty: float = 0.0
    coverage_penalty: float = 0.0
    sampling_topk: int = 1
    sampling_temperature: float = 1.0
    min_length: int = 0
    max_length: int = 250
    n_best: int = 1
    seed: int = 0
    target_prefix: tuple[int, ...] | list[int] = ()  # a list is stored as a tuple
    suppress_ids: tuple[int, ...] | list[int] = ()

    def __post_init__(self):  # the checks every decoding entry point shares (options.py)
        opt.require_int("beam_size", self.beam_size, 1)
        opt.require_int("sampling_topk", self.sampling_topk, 0)
        opt.require_number("sampling_temperature", self.sampling_temperature, positive=True)
        opt.check_lengths(self.max_length, self.min_length)
        opt.require_int("n_best", self.n_best, 1, self.beam_size, "beam_size")
        opt.require_number("length_penalty", self.length_penalty)
        opt.require_number("coverage_penalty", self.coverage_penalty)
        opt.require_int("seed", self.seed)
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
        return RandomSampler(topk=self.sampling_topk, temperature=self.sampling_temperature)

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
        )

    @property
    def rng(self) -> jax.Array | None:
        return None if self.sampling_topk == 1 else jax.random.key(self.seed)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids text-level decoding needs: jaxformer's tokenizers' by default; a loaded checkpoint's
    (``Pretrained.special_ids``) otherwise. ``unk_id`` None: the tokenizer has no unknown token."""

    start: int = BOS_ID
    end: int = EOS_ID
    pad: int = PAD_ID
    unk: int | None = UNK_ID


@dataclasses.dataclass(frozen=True)
class Output:
    texts: list[str]  # n-best hypotheses, best first
    scores: list[float]  # their search scores (log-probabilities, with penalties for beams)
    truncated: bool  # the best hypothesis stopped at max_length without EOS
    unknown: tuple[str, ...] = ()  # symbols of the input outside the vocabulary (encoded as UNK)


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def encode_sources(
    tokenizer: Tokenizer, lines: Sequence[str], max_source_length: int, truncate: bool = False
) -> list[list[int]]:
    """Token ids of each line; a line longer than ``max_source_length`` tokens raises (names it)
    unless ``truncate``, which keeps its first ``max_source_length`` tokens."""
    out = []
    for number, line in enumerate(lines, 1):
        ids = tokenizer.encode(line)
        if len(ids) > max_source_length:
            if not truncate:
                raise ValueError(
                    f"input line {number} has {len(ids)} tokens, more than the model's maximum "
                    f"source length {max_source_length} (pass truncate=True / --truncate to keep "
                    "the first tokens)"
                )
            ids = ids[:max_source_length]
        out.append(ids)
    return out


def length_batches(
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    length_step: int = 16,
    pad_id: int = PAD_ID,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(index int32[B], ids int32[B, S])]``: sorted by length, padded with ``pad_id`` to
    buckets; index -1 = filler."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        length = _round_up(max(len(sequences[i]) for i in chunk), length_step)
        ids = np.full((batch_size, length), pad_id, np.int32)
        index = np.full((batch_size,), -1, np.int32)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = sequences[i]
            index[row] = i
        batches.append((index, ids))
    return batches


def translate_texts(
    model,
    params,
    src_tokenizer: Tokenizer,
    tgt_tokenizer: Tokenizer,
    lines: Sequence[str],
    options: DecodeOptions = DecodeOptions(),
    *,
    batch_size: int = 32,
    truncate: bool = False,
    progress: bool = False,
    special_ids: SpecialIds = SpecialIds(),
) -> list[Output]:
    """Translates ``lines`` (in order). Empty lines translate to an empty output without decoding.

    ``Output.unknown`` names the symbols of each line that the source vocabulary lacks (they were
    translated as ``<unk>``). ``special_ids``: the start, end, padding and unknown ids of the
    tokenizers (jaxformer's by default; ``Pretrained.translate`` passes a checkpoint's).
    """
    _check_batch_size(batch_size)
    sources = encode_sources(src_tokenizer, lines, model.config.max_len, truncate)
    unknown = _unknown(src_tokenizer, lines, sources, special_ids.unk)
    todo = [i for i, ids in enumerate(sources) if ids]
    outputs: list[Output | None] = [
        None if ids else Output([""] * options.n_best, [0.0] * options.n_best, False)
        for ids in sources
    ]
    batches = length_batches([sources[i] for i in todo], batch_size, pad_id=special_ids.pad)
    bar = _progress(len(todo), progress, "translating")
    rng = options.rng
    for index, ids in batches:
        if rng is not None:
            rng, key = jax.random.split(rng)
        else:
            key = None
        result = _decode_batch(model, params, ids, options, key, special_ids)
        for row, i in enumerate(index.tolist()):
            if i >= 0:
                line = todo[i]
                outputs[line] = _output(result, row, tgt_tokenizer, options, unknown[line])
                bar.update(1)
    bar.close()
    return [o for o in outputs if o is not None]


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _unknown(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    encoded: Sequence[Sequence[int]],
    unk_id: int | None = UNK_ID,
) -> list[tuple[str, ...]]:
    """Per text, the symbols encoded as UNK (looked up only where an UNK id occurs)."""
    return [
        tuple(out_of_vocabulary(tokenizer, text)) if unk_id is not None and unk_id in ids else ()
        for text, ids in zip(texts, encoded, strict=True)
    ]


def unknown_summary(outputs: Sequence[Output], what: str = "lines") -> str | None:
    """One sentence on the inputs that had symbols outside the vocabulary, or None if none had.

    ``"2 of 5 lines had symbols outside the vocabulary (mapped to <unk>, so their outputs are
    unreliable): 'h', 'e' (first: line 1)"``.
    """
    hit = [number for number, o in enumerate(outputs, 1) if o.unknown]
    if not hit:
        return None
    symbols = list(dict.fromkeys(s for o in outputs for s in o.unknown))
    shown = ", ".join(repr(s) for s in symbols[:10]) + (", ..." if len(symbols) > 10 else "")
    return (
        f"{len(hit)} of {len(outputs)} {what} had symbols outside the vocabulary (mapped to <unk>, "
        f"so their outputs are unreliable): {shown} (first: {what[:-1]} {hit[0]})"
    )


def _decode_batch(
    model, params, ids, options: DecodeOptions, key, special: SpecialIds = SpecialIds()
):
    prefix = {}
    if options.target_prefix:  # the same tokens for every row
        prefix["target_prefix"] = np.tile(np.asarray([options.target_prefix]), (len(ids), 1))
    search = {**options.search(key), "end_id": special.end}
    result = generate(model, params, ids, start_id=special.start, **search, **prefix)
    return jax.device_get((result.ids, result.lengths, result.scores))


def _output(result, row: int, tokenizer: Tokenizer, options: DecodeOptions, unknown) -> Output:
    """Row ``row`` of a decoded batch as text: its n-best hypotheses and their scores."""
    hyp_ids, lengths, scores = result
    texts = [
        tokenizer.decode(hyp_ids[row, k, : lengths[row, k]].tolist()) for k in range(options.n_best)
    ]
    truncated = bool(lengths[row, 0] >= options.max_length)  # no EOS within the limit
    return Output(texts, scores[row, : options.n_best].tolist(), truncated, unknown)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="line", leave=False)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, its default 13a tokenisation) and exact match, both in percent."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("corpus_scores needs at least one hypothesis")
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
    exact = np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)])
    return {"bleu": float(bleu.score), "exact_match": 100.0 * float(exact)}


def continue_texts(
    model,
    params,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    options: DecodeOptions,
) -> list[Output]:
    """Language models: the continuation of each prompt (at least one token each).

    The prompts are decoded together, whatever their lengths (right-padded; each row continues at
    its own positions, so its result does not depend on the others).
    """
    encoded = [tokenizer.encode(p) for p in prompts]
    unknown = _unknown(tokenizer, prompts, encoded)
    for number, ids in enumerate(encoded, 1):
        if not ids:
            raise ValueError(f"prompt {number} is empty: a language model needs >= 1 token")
    result = _decode_batch(model, params, encoded, options, options.rng)
    return [_output(result, row, tokenizer, options, unknown[row]) for row in range(len(encoded))]
