"""The text of a greedy or sampling request as its tokens arrive, for streaming and stop strings.

The engine streams a request's new token ids a chunk at a time; a client wants text. ``TextStream``
decodes the ids received so far and gives out the text that can no longer change: it holds back
a trailing U+FFFD (a byte-level token that ends inside a UTF-8 character) and the end of the text
that could be the start of a stop string. When a stop string appears, the request is over: the
text is cut before it (``decoding.stop.cut_at_stop``, as OpenAI's ``stop`` and ``generate``'s
``stop`` cut it), and ``tokens`` keeps the fewest tokens whose text holds it, as many as
``generate`` with the same ``stop`` would have generated. The pieces given out add up to
``text``, the text the request returns when it is not streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxformer.decoding.stop import cut_at_stop


class TextStream:
    """Text of a growing list of tokens (``push``), given out in pieces that never change."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = tuple(stops)
        self.tokens: list[int] = []
        self.sent = ""  # the text given out so far
        self.stopped = False  # a stop string appeared: no more tokens are wanted

    def push(self, tokens: Sequence[int]) -> str:
        """Takes new tokens; returns the text that follows what was given out (maybe "")."""
        if self.stopped:
            return ""
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in tokens)
        text = self.decode(self.tokens)
        if self.stops and cut_at_stop(text, self.stops)[1]:
            for end in range(start + 1, len(self.tokens) + 1):  # the token that completed it
                text, found = cut_at_stop(self.decode(self.tokens[:end]), self.stops)
                if found:
                    break
            self.tokens, self.stopped = self.tokens[:end], True
            return self._give(text)
        return self._give(self._settled(text))

    @property
    def text(self) -> str:
        """The whole text: cut before a stop string, else the decoded tokens."""
        text = self.decode(self.tokens)
        return cut_at_stop(text, self.stops)[0] if self.stops else text

    def finish(self) -> str:
        """The rest of the text, once no token will come."""
        return self._give(self.text)

    def _settled(self, text: str) -> str:
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        held = 0
        for stop in self.stops:  # the longest end of the text that begins a stop string
            for size in range(min(len(stop) - 1, end), held, -1):
                if text[end - size : end] == stop[:size]:
                    held = size
                    break
        return text[: end - held]

    def _give(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding more tokens changed earlier text: wait
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


__all__ = ["TextStream"]
