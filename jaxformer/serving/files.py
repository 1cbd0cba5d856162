"""Files through the engine: the engine that ``decoding.texts`` (and the command line) decode a list
of inputs with, one request per line, all with the same ``DecodeOptions``.

``texts.iter_translations(..., engine_for=engine_for(model, params, options, slots=32))`` makes the
engine once it knows the longest input, sends every line through it, and writes outputs in input
order as they come (``decoding.ordered.in_order_submitted``); the engine is closed at the end.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxformer.decoding.adapters import adapter_for
from jaxformer.decoding.decode_options import DecodeOptions, SpecialIds
from jaxformer.serving.engine import Engine, check_served

BUCKET = 16  # input lengths are padded to a multiple of it (one prefill compile per bucket)


def engine_for(
    model, params, options: DecodeOptions, *, slots: int, special_ids: SpecialIds = SpecialIds()
) -> Callable[[int], Engine]:
    """A function of the longest input's length (in tokens) that starts an engine able to decode
    every input with ``options``: ``slots`` groups of ``options.beam_size`` rows (the batch size
    of static batching), its caches sized for that input and ``options.max_length``."""

    check_served(options)
    adapter = adapter_for(model)
    limit = adapter.inputs.max_len

    def make(longest: int) -> Engine:
        sampling = options.sampling_topk != 1
        width = max(1, -(-longest // BUCKET) * BUCKET)
        if width > limit or adapter.positions(width, options.max_length) > limit:
            width = max(longest, 1)  # no room to round up: the engine checks the rest
        return Engine(
            model,
            params,
            start_id=special_ids.start,
            end_id=special_ids.end,
            groups={options.beam_size: slots},
            max_length=options.max_length,
            max_input_length=width,
            sampling_topk=options.sampling_topk if sampling else None,
            nucleus=options.top_p < 1,
            coverage=options.coverage_penalty != 0,
            bucket=BUCKET,
            suppress_ids=options.suppress_ids,  # Marian's padding
            prefix_length=len(options.target_prefix),  # NLLB's target language, --target-prefix
        )

    return make
