"""Decoding without a KV cache: the baselines that show what the cache buys.

``greedy_without_cache`` is the textbook loop (the Annotated Transformer's ``greedy_decode``) made
static-shape so it compiles once: at step t it reruns the teacher-forced decoder over the whole target
buffer of length ``max_length`` (the causal mask makes the slots after t irrelevant) and reads position
t. Every step therefore pays for the full padded length; a growing-prefix loop would pay for t tokens
but needs one compilation per length. ``lm_greedy_without_cache`` is the same for decoder-only models
(``DecoderOnlyLM``, ``HourglassLM``) continuing a prompt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxformer.decoding.search_step import EOS_PENALTY
from jaxformer.models.encoder_decoder import Transformer
from jaxformer.typing import Array, Int, PyTree


@functools.partial(
    jax.jit, static_argnames=("model", "start_id", "end_id", "max_length", "min_length")
)
def greedy_without_cache(
    model: Transformer,
    params: PyTree,
    src_ids: Int[Array, "B S"],
    *,
    start_id: int,
    end_id: int,
    max_length: int,
    min_length: int = 0,
) -> Int[Array, "B T"]:
    """Greedy ids ``[B, max_length]`` (end_id after EOS), recomputing the whole prefix every step.

    ``min_length`` adds ``dynamic_decode``'s EOS penalty before that step, so both give the same ids.
    """
    memory, valid = model.apply({"params": params}, src_ids, method=Transformer.encode)
    batch = src_ids.shape[0]
    buffer = jnp.full([batch, max_length], start_id, jnp.int32)  # [B, T] decoder inputs
    eos = jax.nn.one_hot(end_id, model.config.vocab_size, dtype=jnp.float32)[None]  # [1, V]

    def step(carry, t):
        buffer, finished = carry
        logits, _ = model.apply(
            {"params": params}, buffer, memory, valid, method=Transformer.decode
        )
        logits = jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False)  # [B, V]
        logits = jnp.where(t < min_length, logits + EOS_PENALTY * eos, logits)
        token = jnp.argmax(logits, -1)  # [B] the first maximum, as BestSampler
        token = jnp.where(finished, end_id, token).astype(jnp.int32)
        next_slot = jnp.minimum(t + 1, max_length - 1)
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, token, next_slot, 1)
        return (buffer, finished | (token == end_id)), token

    _, tokens = jax.lax.scan(
        step, (buffer, jnp.zeros([batch], bool)), jnp.arange(max_length, dtype=jnp.int32)
    )
    return tokens.T  # [T, B] -> [B, T]


@functools.partial(jax.jit, static_argnames=("model", "end_id", "max_length", "min_length"))
def lm_greedy_without_cache(
    model,
    params: PyTree,
    prompt_ids: Int[Array, "B P"],
    *,
    end_id: int,
    max_length: int,
    min_length: int = 0,
) -> Int[Array, "B T"]:
    """Greedy continuation ``[B, max_length]`` of equal-length prompts, rerunning the full causal pass.

    A buffer ``[B, P + max_length]`` holds the prompt; step t reads the logits at ``P - 1 + t`` and
    writes its token into slot ``P + t``. ``min_length`` adds ``dynamic_decode``'s EOS penalty, so the
    ids equal ``jaxformer.generate``'s; unlike it, tokens after an EOS are not forced to EOS.
    """
    batch, prompt = prompt_ids.shape
    buffer = jnp.zeros([batch, prompt + max_length], jnp.int32).at[:, :prompt].set(prompt_ids)
    eos = jax.nn.one_hot(end_id, model.config.vocab_size, dtype=jnp.float32)[None]  # [1, V]

    def step(buffer, t):
        logits = model.apply({"params": params}, buffer)  # [B, P + T, V]
        logits = jax.lax.dynamic_index_in_dim(logits, prompt - 1 + t, 1, keepdims=False)  # [B, V]
        logits = jnp.where(t < min_length, logits + EOS_PENALTY * eos, logits)
        token = jnp.argmax(logits, -1).astype(jnp.int32)  # [B]
        return jax.lax.dynamic_update_index_in_dim(buffer, token, prompt + t, 1), token

    _, tokens = jax.lax.scan(step, buffer, jnp.arange(max_length, dtype=jnp.int32))
    return tokens.T  # [T, B] -> [B, T]
