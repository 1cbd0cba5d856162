"""Stop strings: a hypothesis ends at the first token that completes one of them.

    table = stop_table(tokenizer.token_bytes(), ["\\n\\n", "END"])
    result = generate(model, params, prompts, end_id=..., stop=table)
    text = cut_at_stop(tokenizer.decode(ids), ["\\n\\n", "END"])   # the match is not returned

Text is bytes to the search: a stop string can begin inside one token and end inside another, and
a byte-level token can hold half a UTF-8 character. The stop strings' UTF-8 bytes are compiled into
an Aho-Corasick automaton (Aho and Corasick 1975): Q states (one per prefix of a stop string) and,
for every state and byte, the state after reading it. Running each token's bytes through it from
every state gives two ``[Q, V]`` tables: the state after the token (``transition``) and whether a
stop string ended inside the token (``hit``). The search carries one automaton state per row,
reordered with the beams, and at each step reads both tables at (state, emitted token): a row whose
token completes a match is finished (the end token follows at no cost, as after EOS). Only generated
tokens are read (a target prefix's too), never the prompt. ``cut_at_stop`` then cuts the decoded text
before the first match, as OpenAI's and vLLM's ``stop`` do: the stop string is not returned.

A token's bytes are those ``tokenizer.token_bytes()`` gives (its text as decoding renders it in the
middle of a text: a sentencepiece ``▁`` is a space, a byte-level BPE symbol its byte, special
tokens nothing). Tokenizers that drop the space before the first word make a stop string that starts
with a space match one position earlier than in the decoded text; ``cut_at_stop`` cuts the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class StopTable:
    """The automaton over token ids: ``transition[q, v]`` (next state) and ``hit[q, v]``."""

    transition: Any  # int32[Q, V]
    hit: Any  # bool[Q, V]

    @property
    def vocab_size(self) -> int:
        return self.transition.shape[1]


def check_stop(strings) -> tuple[str, ...]:
    """Stop strings as a tuple of non-empty strings (a single string is refused, as for lines)."""
    if strings is None:
        return ()
    if isinstance(strings, str) or not isinstance(strings, tuple | list):
        raise ValueError(f"stop must be a list of non-empty strings, got {strings!r}")
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must be a list of non-empty strings, got {strings!r}")
    return tuple(strings)


def _automaton(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(delta int32[Q, 256], final bool[Q])`` of the Aho-Corasick automaton of ``patterns``."""
    goto, final = [{}], [False]
    for pattern in patterns:  # the trie
        state = 0
        for byte in pattern:
            if byte not in goto[state]:
                goto.append({})
                final.append(False)
                goto[state][byte] = len(goto) - 1
            state = goto[state][byte]
        final[state] = True
    delta = np.zeros((len(goto), 256), np.int32)
    fail = [0] * len(goto)
    queue = []
    for byte in range(256):  # breadth first: each state's failure link is shallower
        child = goto[0].get(byte, 0)
        delta[0, byte] = child
        if child:
            queue.append(child)
    while queue:
        state = queue.pop(0)
        final[state] = final[state] or final[fail[state]]  # a match ending here, through links
        for byte in range(256):
            child = goto[state].get(byte)
            if child is None:
                delta[state, byte] = delta[fail[state], byte]
            else:
                fail[child] = delta[fail[state], byte]
                delta[state, byte] = child
                queue.append(child)
    return delta, np.asarray(final)


def stop_table(
    token_bytes: Sequence[bytes], strings: Sequence[str], vocab_size: int | None = None
) -> StopTable:
    """The ``StopTable`` of ``strings`` for a vocabulary whose token i reads ``token_bytes[i]``;
    ``vocab_size``: the model's (ids past the tokenizer's read nothing), default its length."""
    strings = check_stop(strings)
    vocab = len(token_bytes) if vocab_size is None else vocab_size
    if vocab < len(token_bytes):
        raise ValueError(f"vocab_size={vocab} is smaller than the {len(token_bytes)} tokens given")
    token_bytes = [*token_bytes, *[b""] * (vocab - len(token_bytes))]
    delta, final = _automaton([s.encode("utf-8") for s in strings])
    states = delta.shape[0]
    longest = max((len(b) for b in token_bytes), default=0)
    padded = np.zeros((vocab, max(longest, 1)), np.int32)
    length = np.zeros(vocab, np.int32)
    for i, text in enumerate(token_bytes):
        padded[i, : len(text)] = np.frombuffer(text, np.uint8)
        length[i] = len(text)
    state = np.broadcast_to(np.arange(states, dtype=np.int32)[:, None], (states, vocab)).copy()
    hit = np.zeros((states, vocab), bool)
    for k in range(padded.shape[1]):  # every token's k-th byte, from every state at once
        valid = (k < length)[None, :]
        moved = delta[state, padded[None, :, k]]
        state = np.where(valid, moved, state)
        hit |= valid & final[state]
    return StopTable(jnp.asarray(state), jnp.asarray(hit))


def cut_at_stop(text: str, strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the first occurrence of any of ``strings``, and whether one was found."""
    found = [i for i in (text.find(s) for s in strings) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def table_for(tokenizer, strings: Sequence[str], vocab_size: int) -> StopTable | None:
    """The ``StopTable`` of ``strings`` for ``tokenizer`` (None without strings)."""
    if not strings:
        return None
    if not hasattr(tokenizer, "token_bytes"):
        raise ValueError(
            f"stop strings need the text of every token; a {type(tokenizer).__name__} cannot give "
            "it (token_bytes)"
        )
    return stop_table(tokenizer.token_bytes(), strings, vocab_size)
