"""Options that look at what a hypothesis already holds: the repetition penalty and no-repeat n-grams.

Both read a row's **history**: the tokens before the first generated one (an LM's prompt, whole; an
encoder-decoder's start token), then every token the row generated, target prefix included. The
history is part of the search state (``int32 [R, C + max_length]``, reordered with the beams) and
exists only when one of the options is on.

- ``repetition_penalty`` θ (CTRL, Keskar et al. 2019, section 4.1; Hugging Face's and CTranslate2's
  ``repetition_penalty``): the logit of every token present in the history is divided by θ when it
  is positive and multiplied by θ otherwise, before the log-softmax. θ > 1 discourages repetition,
  θ = 1 changes nothing. It applies to the raw logits in every strategy (as CTranslate2 does;
  Hugging Face applies it to raw logits when sampling or greedy, but to log-softmax scores in beam
  search, where a multiplication by θ moves all candidates and a division never happens).
- ``no_repeat_ngram_size`` n (Paulus et al. 2018; Hugging Face's ``no_repeat_ngram_size``): a token
  that would complete an n-gram already present in the history gets a -inf logit. n = 1 bans every
  token of the history.

Both are applied to the logits before the end-token handling of the loop (``min_length``, finished
rows forced to end), so a finished row still ends; the target prefix's forced tokens are not
affected by them (they are forced after the pick), but count as history.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.typing import Array, Bool, Float, Int


def history_mask(history: Int[Array, "R H"], filled: Int[Array, " R"]) -> Bool[Array, "R H"]:
    """Which history slots hold tokens: the first ``filled[r]`` of row r."""
    return jnp.arange(history.shape[1])[None, :] < filled[:, None]


def seen_tokens(history, filled, vocab: int) -> Bool[Array, "R V"]:
    """``seen[r, v]``: token v occurs in row r's history."""
    rows = jnp.arange(history.shape[0])[:, None]  # [R, 1]
    valid = history_mask(history, filled)  # [R, H]
    return jnp.zeros([history.shape[0], vocab], bool).at[rows, history].max(valid)


def penalise_repetitions(logits: Float[Array, "R V"], seen: Bool[Array, "R V"], penalty):
    """CTRL's penalty on the logits of the ``seen`` tokens (see the module docstring)."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def banned_ngrams(history, filled, size: int, vocab: int) -> Bool[Array, "R V"]:
    """``banned[r, v]``: emitting v would repeat an n-gram (n = ``size``) of row r's history.

    The row's last n-1 tokens are compared with every window of n-1 history tokens; where they
    match, the token after that window is banned (the window and its follower must lie in the
    filled part of the history)."""
    rows, length = history.shape
    row_index = jnp.arange(rows)[:, None]  # [R, 1]
    if size == 1:
        return seen_tokens(history, filled, vocab)
    starts = jnp.arange(length - size + 1)  # j: window history[j : j+n-1], follower history[j+n-1]
    if starts.size == 0:
        return jnp.zeros([rows, vocab], bool)
    last = jnp.take_along_axis(
        history, jnp.maximum(filled[:, None] - (size - 1) + jnp.arange(size - 1)[None], 0), axis=1
    )  # [R, n-1]: the row's last n-1 tokens
    windows = history[:, starts[:, None] + jnp.arange(size - 1)[None, :]]  # [R, J, n-1]
    match = jnp.all(windows == last[:, None, :], axis=-1)  # [R, J]
    match &= (starts[None, :] + size - 1 < filled[:, None]) & (filled[:, None] >= size - 1)
    followers = history[:, starts + size - 1]  # [R, J]
    return jnp.zeros([rows, vocab], bool).at[row_index, followers].max(match)


def apply(logits, history, filled, *, repetition_penalty: float, no_repeat_ngram_size: int):
    """The logits with both options applied (each only when on)."""
    vocab = logits.shape[-1]
    if repetition_penalty != 1.0:
        seen = seen_tokens(history, filled, vocab)
        logits = penalise_repetitions(logits, seen, jnp.float32(repetition_penalty))
    if no_repeat_ngram_size:
        banned = banned_ngrams(history, filled, no_repeat_ngram_size, vocab)
        logits = jnp.where(banned, -jnp.inf, logits)
    return logits


def initial_history(context, context_lengths, width: int, max_length: int):
    """``(history int32[R, C + max_length], filled int32[R])`` from the context ``[B, C]`` (each
    row's tokens before the first generated one) tiled to W beams per entry."""
    batch, columns = context.shape
    history = jnp.zeros([batch, columns + max_length], jnp.int32)
    history = jax.lax.dynamic_update_slice(history, context.astype(jnp.int32), (0, 0))
    return jnp.repeat(history, width, axis=0), jnp.repeat(context_lengths.astype(jnp.int32), width)


def append(history, filled, words: Int[Array, " R"]):
    """The history with each row's new word at its next free slot."""
    rows = jnp.arange(history.shape[0])
    return history.at[rows, filled].set(words, mode="drop"), filled + 1
