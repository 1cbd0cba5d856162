"""Text in, text out: translate lines batched by length, continue prompts, score with BLEU.

    options = DecodeOptions(beam_size=4, length_penalty=0.6)
    outputs = translate_texts(model, params, src_tok, tgt_tok, lines, options)
    outputs[i].texts[0]                         # the best hypothesis of line i; .scores alongside
    corpus_scores([o.texts[0] for o in outputs], references)   # {"bleu": ..., "exact_match": ...}

    for output in iter_translations(model, params, src_tok, tgt_tok, lines, options):
        write(output)                           # in input order, as soon as it is ready

Lines are read in windows, sorted by length within each and cut into batches of ``batch_size``
whose source length is rounded up to a multiple of 16 (``ordered.py``): a file of any size
compiles only a handful of shapes (one per length bucket), results come back in input order, and
each as soon as the lines before it are done. Decoding a row does not depend on the other rows of
its batch.

Sources are token ids without BOS or EOS, right-padded with ``PAD_ID`` (0), as ``encode_sources``
and ``length_batches`` make them. A symbol the source tokenizer does not know becomes ``UNK_ID``:
``Output.unknown`` lists such symbols per line (``unknown_summary`` words a warning), so a caller
can tell the user rather than return a translation of ``<unk>`` without a word.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jaxformer.data.tokenizers import (
    PAD_ID,
    UNK_ID,
    Tokenizer,
    out_of_vocabulary,
)
from jaxformer.decoding.decode_options import DecodeOptions, SpecialIds
from jaxformer.decoding.generation import generate
from jaxformer.decoding.ordered import WINDOW_BATCHES, in_order, in_order_submitted, sorted_batches
from jaxformer.decoding.stop import cut_at_stop, table_for


@dataclasses.dataclass(frozen=True)
class Output:
    texts: list[str]  # n-best hypotheses, best first
    scores: list[float]  # their search scores (log-probabilities, with penalties for beams)
    truncated: bool  # the best hypothesis stopped at max_length without EOS
    unknown: tuple[str, ...] = ()  # symbols of the input outside the vocabulary (encoded as UNK)
    input_truncated: bool = False  # the input was longer than the model allows and was cut


def encode_sources(
    tokenizer: Tokenizer, lines: Sequence[str], max_source_length: int, truncate: bool = False
) -> list[list[int]]:
    """Token ids of each line; a line longer than ``max_source_length`` tokens raises (names it)
    unless ``truncate``, which keeps its first ``max_source_length`` tokens."""
    return _encode(tokenizer, lines, max_source_length, truncate)[0]


def _encode(tokenizer, lines, limit: int, truncate: bool) -> tuple[list[list[int]], list[bool]]:
    """``encode_sources`` and, per line, whether it was cut."""
    out, cut = [], []
    for number, line in enumerate(lines, 1):
        ids = tokenizer.encode(line)
        cut.append(len(ids) > limit)
        if cut[-1]:
            if not truncate:
                raise ValueError(
                    f"input line {number} has {len(ids)} tokens, more than the model's maximum "
                    f"source length {limit} (pass truncate=True / --truncate to keep the first "
                    "tokens)"
                )
            ids = ids[:limit]
        out.append(ids)
    return out, cut


def length_batches(
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    length_step: int = 16,
    pad_id: int = PAD_ID,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(index int32[B], ids int32[B, S])]``: sorted by length, padded with ``pad_id`` to
    buckets; index -1 = filler (``ordered.sorted_batches`` over all of ``sequences``)."""
    batches = sorted_batches(
        sequences, range(len(sequences)), batch_size, length_step=length_step, pad_id=pad_id
    )
    return [(index, ids) for index, ids, _ in batches]


def check_lines(lines, name: str = "lines") -> list[str]:
    """``lines`` as a list of strings; a single string is refused (it would be read as one
    input per character)."""
    if isinstance(lines, str | bytes):
        raise ValueError(
            f"{name} must be a list of strings, one input per item; got a single "
            f"{type(lines).__name__} (wrap one text as [text], or split a text with .splitlines())"
        )
    lines = list(lines)
    for number, line in enumerate(lines, 1):
        if not isinstance(line, str):
            raise ValueError(f"{name}[{number - 1}] must be a string, got {type(line).__name__}")
    return lines


def iter_translations(
    model,
    params,
    src_tokenizer: Tokenizer,
    tgt_tokenizer: Tokenizer,
    lines: Sequence[str],
    options: DecodeOptions = DecodeOptions(),
    *,
    batch_size: int = 32,
    truncate: bool = False,
    special_ids: SpecialIds = SpecialIds(),
    source_prefix: str = "",
    window: int | None = None,
    engine_for: Callable[[int], Any] | None = None,
) -> Iterator[Output]:
    """The translation of each line, in input order, each as soon as every earlier one is done.

    Lines are sorted by length within windows of ``window`` lines (default: 16 batches), never
    over the whole input (``ordered.py``), so a caller that writes outputs as they come loses at
    most one window when interrupted. Empty lines translate to an empty output without decoding.
    ``source_prefix``: text put before every line (T5's task prefixes, ``translate English to
    German: ``). ``Output.unknown`` names the symbols of each line that the source vocabulary lacks
    (they were translated as ``<unk>``); ``Output.input_truncated`` says ``truncate`` cut the line.
    ``special_ids``: the start, end, padding and unknown ids of the tokenizers (jaxformer's by
    default; ``Pretrained.translate`` passes a checkpoint's). ``engine_for(longest)``: a serving
    engine (``jaxformer.serving.engine_for``) for sources of at most ``longest`` tokens; the lines
    then go through it one by one (continuous batching) instead of in sorted batches: the same
    results, a sampled line drawing with ``options.seed``'s key whatever its neighbours.
    """
    lines = check_lines(lines)
    _check_batch_size(batch_size)
    texts = [source_prefix + line if line else line for line in lines]
    sources, cut = _encode(src_tokenizer, texts, model.config.max_len, truncate)
    unknown = _unknown(src_tokenizer, texts, sources, special_ids.unk)
    keys = _keys(options)
    stop = table_for(tgt_tokenizer, options.stop, model.config.vocab_size)

    def decode(index, ids, lengths):
        result = _decode_batch(model, params, ids, options, next(keys), special_ids, stop=stop)
        return [
            _output(result, row, tgt_tokenizer, options, unknown[i], cut[i])
            for row, i in enumerate(index.tolist())
        ]

    empty = lambda i: Output([""] * options.n_best, [0.0] * options.n_best, False, unknown[i])
    if engine_for is not None:
        alone = lambda i, r: _output(_arrays(r), 0, tgt_tokenizer, options, unknown[i], cut[i])
        return _through(
            engine_for, sources, options, alone, empty, window or WINDOW_BATCHES * batch_size
        )
    batching = dict(batch_size=batch_size, window=window, pad_id=special_ids.pad)
    return (output for _, output in in_order(sources, decode, empty, **batching))


def _through(engine_for, items, options, output, empty, in_flight: int) -> Iterator[Output]:
    """The outputs of ``items`` decoded one by one by a serving engine, in input order, at most
    ``in_flight`` of them submitted ahead of the next one out."""
    engine = engine_for(max((len(x) for x in items), default=1))
    try:
        submit = lambda i: engine.submit(items[i], options)
        ordered = in_order_submitted(items, submit, output, empty, window=in_flight)
        yield from (out for _, out in ordered)
    finally:
        engine.close()


def _arrays(result) -> tuple:
    """A batch-of-one result as ``_decode_batch`` returns a batch."""
    return jax.device_get((result.ids, result.lengths, result.scores))


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
    source_prefix: str = "",
    window: int | None = None,
) -> list[Output]:
    """``iter_translations`` as a list (with a progress bar if ``progress``)."""
    outputs = iter_translations(
        model, params, src_tokenizer, tgt_tokenizer, lines, options, batch_size=batch_size,
        truncate=truncate, special_ids=special_ids, source_prefix=source_prefix, window=window,
    )  # fmt: skip
    done = []
    with _progress(None if isinstance(lines, str) else len(lines), progress, "translating") as bar:
        for output in outputs:
            done.append(output)
            bar.update(1)
    return done


def _keys(options: DecodeOptions) -> Iterator:
    """One random key per decoded batch (sampling), or None forever."""
    rng = options.rng
    while True:
        if rng is None:
            yield None
        else:
            rng, key = jax.random.split(rng)
            yield key


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
    model,
    params,
    ids,
    options: DecodeOptions,
    key,
    special: SpecialIds = SpecialIds(),
    lengths=None,
    stop=None,
):
    prefix = {}
    if options.target_prefix:  # the same tokens for every row
        prefix["target_prefix"] = np.tile(np.asarray([options.target_prefix]), (len(ids), 1))
    if lengths is not None:
        prefix["prompt_lengths"] = lengths
    search = {**options.search(key), "end_id": special.end}
    result = generate(model, params, ids, start_id=special.start, stop=stop, **search, **prefix)
    return jax.device_get((result.ids, result.lengths, result.scores))


def _output(
    result,
    row: int,
    tokenizer: Tokenizer,
    options: DecodeOptions,
    unknown,
    cut: bool = False,
    prompt: Sequence[int] = (),
) -> Output:
    """Row ``row`` of a decoded batch as text: its n-best hypotheses and their scores
    (``prompt``: ids decoded together with each hypothesis, before it)."""
    hyp_ids, lengths, scores = result
    texts, stopped = [], []
    for k in range(options.n_best):
        hypothesis = hyp_ids[row, k, : lengths[row, k]].tolist()
        text, found = cut_at_stop(tokenizer.decode(hypothesis), options.stop)  # match dropped
        texts.append(_with_prompt(tokenizer, prompt, hypothesis, text) if prompt else text)
        stopped.append(found)
    truncated = bool(lengths[row, 0] >= options.max_length) and not stopped[0]  # no end, no stop
    return Output(texts, scores[row, : options.n_best].tolist(), truncated, unknown, cut)


def _with_prompt(tokenizer: Tokenizer, prompt, hypothesis, text: str) -> str:
    """The prompt and the continuation ``text`` (cut at a stop string) as one decoded text: the
    prompt and the hypothesis decoded together (a tokenizer may space them so), with the end
    that the hypothesis alone decodes to replaced by ``text``."""
    whole = tokenizer.decode([*prompt, *hypothesis])
    alone = tokenizer.decode(hypothesis)
    if whole.endswith(alone):
        return whole[: len(whole) - len(alone)] + text
    return tokenizer.decode(list(prompt)) + text


def _progress(total: int | None, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="line", leave=False)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults: 13a tokenisation; character 6-grams, beta 2)
    and exact match, all in percent."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("corpus_scores needs at least one hypothesis")
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    exact = np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)])
    return {
        "bleu": float(bleu.score),
        "chrf": float(chrf.score),
        "exact_match": 100.0 * float(exact),
    }


def iter_continuations(
    model,
    params,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    options: DecodeOptions,
    *,
    batch_size: int = 32,
    window: int | None = None,
    special_ids: SpecialIds = SpecialIds(),
    return_prompt: bool = False,
    engine_for: Callable[[int], Any] | None = None,
) -> Iterator[Output]:
    """Language models: the continuation of each prompt (at least one token each), in input order,
    each as soon as every earlier one is done (windows and batches, or ``engine_for``, as
    ``iter_translations``').

    Prompts of different lengths share a batch (right-padded; each row continues at its own
    positions, so its result does not depend on the others). ``return_prompt``: each text is the
    prompt's ids and the continuation's decoded together (False: the continuation's alone).
    """
    prompts = check_lines(prompts, "prompts")
    _check_batch_size(batch_size)
    encoded = [tokenizer.encode(p) for p in prompts]
    unknown = _unknown(tokenizer, prompts, encoded, special_ids.unk)
    for number, ids in enumerate(encoded, 1):
        if not ids:
            raise ValueError(f"prompt {number} is empty: a language model needs >= 1 token")
    widest = model.config.max_len - options.max_length + 1  # the prompt width the positions allow
    keys = _keys(options)
    stop = table_for(tokenizer, options.stop, model.config.vocab_size)

    def decode(index, ids, lengths):
        ragged = None if (lengths == ids.shape[1]).all() else lengths
        result = _decode_batch(
            model, params, ids, options, next(keys), special_ids, ragged, stop=stop
        )
        rows = enumerate(index.tolist())
        return [
            _output(result, row, tokenizer, options, unknown[i], prompt=prompt(i))
            for row, i in rows
        ]

    prompt = lambda i: encoded[i] if return_prompt else ()

    if engine_for is not None:
        alone = lambda i, r: _output(
            _arrays(r), 0, tokenizer, options, unknown[i], prompt=prompt(i)
        )
        return _through(
            engine_for, encoded, options, alone, None, window or WINDOW_BATCHES * batch_size
        )
    batching = dict(batch_size=batch_size, window=window, pad_id=special_ids.pad)
    batching |= dict(max_width=widest, filler=(special_ids.pad,))
    return (output for _, output in in_order(encoded, decode, None, **batching))


def continue_texts(
    model,
    params,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    options: DecodeOptions,
    *,
    batch_size: int = 32,
    special_ids: SpecialIds = SpecialIds(),
) -> list[Output]:
    """``iter_continuations`` as a list."""
    return list(
        iter_continuations(
            model, params, tokenizer, prompts, options, batch_size=batch_size,
            special_ids=special_ids,
        )
    )  # fmt: skip
