"""One adapter per model family: how ``generate`` prepares a search from the inputs and takes a step.

The protocol, in full::

    class Adapter(Protocol):            # a frozen dataclass holding the model (a static jit argument)
        inputs: InputSpec               # what the inputs are: name, vocabulary, shortest length, ...
        def positions(self, input_length, max_length) -> int      # positions a search needs
        def prepare(self, params, inputs [B, P], lengths [B] | None, start_id, max_length) -> Prepared
        def step(self, params, ids [R], step, state, shared) -> (logits [R, V], state, attention [R, S] | None)

``prepare`` returns the start ids, the state the search tiles and reorders (KV caches and anything
per row), and what every step reads but the beams never change (``shared``: the encoder memory, one
copy per batch entry). ``generate`` looks the adapter up by the model's class (``adapter_for``); a new
model family plugs in with ``register_adapter(ModelClass, AdapterClass)`` and nothing else changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax.numpy as jnp

from jaxformer.models.decoder_only import DecoderOnlyLM
from jaxformer.models.encoder_decoder import Transformer
from jaxformer.models.hourglass import HourglassLM
from jaxformer.typing import Array, Int, PyTree


class Prepared(NamedTuple):
    start_ids: Int[Array, " B"]  # the first input token of every hypothesis
    state: PyTree  # one row per batch entry; tiled to B*W rows and reordered by the search
    shared: PyTree  # per batch entry, passed to every step as it is (None: nothing shared)
    attention_size: int | None  # S, when the steps return attention over a source


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What ``generate``'s ``inputs`` are for a model family (used by its checks and messages)."""

    name: str  # "source" or "prompt"
    vocab_size: int  # ids must be in [0, vocab_size)
    target_vocab_size: int  # start_id / end_id / beam width / top-k are checked against it
    shortest: int  # the shortest input length allowed
    max_len: int  # the model's position limit
    pad_id: int  # ragged inputs are right-padded with it
    needs_start_id: bool  # the search starts from start_id (else from each prompt's last token)
    has_attention: bool  # steps return attention over the inputs


@runtime_checkable
class Adapter(Protocol):
    inputs: InputSpec

    def positions(self, input_length: int, max_length: int) -> int: ...

    def prepare(self, params, inputs, lengths, start_id, max_length: int) -> Prepared: ...

    def step(self, params, ids, step, state, shared) -> tuple[Any, Any, Any]: ...


@dataclasses.dataclass(frozen=True)
class EncoderDecoderAdapter:
    """``Transformer``: encode once, the memory shared by the beams, the decoder cache per row."""

    model: Transformer

    @property
    def inputs(self) -> InputSpec:
        c = self.model.config
        return InputSpec(
            "source", c.source_vocab_size, c.vocab_size, 0, c.max_len, c.pad_id, True, True
        )

    def positions(self, input_length: int, max_length: int) -> int:
        return max_length  # target positions 0 .. max_length-1

    def prepare(self, params, inputs, lengths, start_id, max_length) -> Prepared:
        model, variables = self.model, {"params": params}
        if inputs.shape[1] == 0:  # empty sources: one padding column, i.e. a fully masked memory
            inputs = jnp.full([inputs.shape[0], 1], model.config.pad_id, jnp.int32)
        encoded, valid = model.apply(variables, inputs, method=Transformer.encode)
        memory = model.apply(variables, encoded, valid, method=Transformer.init_memory)
        cache = model.apply(variables, inputs.shape[0], max_length, method=Transformer.init_cache)
        start_ids = jnp.full([inputs.shape[0]], start_id, jnp.int32)
        return Prepared(start_ids, cache, memory, inputs.shape[1])

    def step(self, params, ids, step, cache, memory):
        return self.model.apply(
            {"params": params}, ids, step, cache, memory, method=Transformer.decode_step
        )


@dataclasses.dataclass(frozen=True)
class LanguageModelAdapter:
    """A decoder-only LM (``DecoderOnlyLM``, ``HourglassLM``) continuing prompts.

    The prompt goes into the cache in one pass (``prefill``) but for its last token, which is the
    search's start id. Prompts of different lengths are right-padded; each row then decodes at its
    own positions (``lengths - 1 + step``), so its result is the one it has alone.
    The state is ``(cache, offset)``: ``offset`` is a scalar when every prompt has the same length
    (a scalar leaf has no batch axis: the search leaves it as it is) and ``int32[B]`` otherwise.
    """

    model: Any

    @property
    def inputs(self) -> InputSpec:
        c = self.model.config
        pad_id = getattr(c, "pad_id", 0)
        return InputSpec("prompt", c.vocab_size, c.vocab_size, 1, c.max_len, pad_id, False, False)

    def positions(self, input_length: int, max_length: int) -> int:
        return input_length - 1 + max_length  # the prompt's first P-1 tokens come first

    def prepare(self, params, prompts, lengths, start_id, max_length) -> Prepared:
        model, variables = self.model, {"params": params}
        batch, width = prompts.shape
        lm = type(model)
        cache = model.apply(variables, batch, width - 1 + max_length, method=lm.init_cache)
        if width > 1:
            _, cache = model.apply(variables, prompts[:, :-1], cache, method=lm.prefill)
        if lengths is None:
            start_ids, offset = prompts[:, -1], jnp.int32(width - 1)
        else:
            last = (lengths - 1)[:, None]  # [B, 1]
            start_ids = jnp.take_along_axis(prompts, last, axis=1)[:, 0]
            offset = lengths - 1  # [B]: each row's position at step 0
        return Prepared(start_ids, (cache, offset), None, None)

    def step(self, params, ids, step, state, shared):
        cache, offset = state
        logits, cache, attention = self.model.apply(
            {"params": params}, ids, offset + step, cache, method=type(self.model).decode_step
        )
        return logits, (cache, offset), attention  # the protocol's three (no source: None)


ADAPTERS: dict[type, type] = {
    Transformer: EncoderDecoderAdapter,
    DecoderOnlyLM: LanguageModelAdapter,
    HourglassLM: LanguageModelAdapter,
}


def register_adapter(model_type: type, adapter_type: type) -> None:
    """Make ``generate`` decode models of ``model_type`` with ``adapter_type(model)``."""
    ADAPTERS[model_type] = adapter_type


def adapter_for(model) -> Adapter:
    for cls in type(model).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls](model)
    known = ", ".join(sorted(t.__name__ for t in ADAPTERS))
    raise TypeError(
        f"generate has no adapter for {type(model).__name__} (known: {known}); add one with "
        "jaxformer.decoding.register_adapter(ModelClass, AdapterClass)"
    )


def step_function(adapter: Adapter, params):
    """``dynamic_decode``'s step function for ``adapter`` (pass ``shared=`` to the search)."""
    return lambda ids, step, state, shared=None: adapter.step(params, ids, step, state, shared)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "EncoderDecoderAdapter",
    "InputSpec",
    "LanguageModelAdapter",
    "Prepared",
    "adapter_for",
    "register_adapter",
    "step_function",
]
