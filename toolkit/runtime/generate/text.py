"""A row's text as its tokens arrive: decoded incrementally, cut at a stop string or end of text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextStream"]


class TextStream:
    """One row's text as tokens arrive: decoded incrementally, finished by end-of-text or a stop
    string. Each token costs time in its own text and the stop strings' lengths, not in the text
    so far: a stop string is looked for only where it could end in the new text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.eos = tokenizer.eos_ids
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in stop if s]
        self._longest = max(map(len, self.stop), default=0)
        # per stop string, the lengths of its proper prefixes by their last character, longest first:
        # the text's end can only begin a stop string at a prefix that ends in the text's last character
        self._prefixes = [{} for _ in self.stop]
        for ends, s in zip(self._prefixes, self.stop, strict=True):
            for n in range(len(s) - 1, 0, -1):
                ends.setdefault(s[n - 1], []).append(n)
        self.buffer = ""
        self.sent = 0
        self.finished = False
        self.stopped = False  # by a stop string or the end-of-text token (else by the caller: a length limit)

    def push(self, token: int) -> str:
        """Adds a token; returns the text that is now safe to show."""
        if self.finished:
            return ""
        if token in self.eos:
            self.stopped = True
            return self.close()
        start = max(0, len(self.buffer) - self._longest + 1)
        self.buffer += self.decoder.push(token)
        hits = [i for i in (self.buffer.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.buffer, self.finished, self.stopped = self.buffer[: min(hits)], True, True
            return self._release(len(self.buffer))
        return self._release(len(self.buffer) - self._held_back())

    def close(self) -> str:
        if not self.finished:
            self.finished = True
            self.buffer += self.decoder.flush()
        return self._release(len(self.buffer))

    def text(self) -> str:
        return self.buffer

    def _held_back(self) -> int:
        """Length of the longest end of the buffer that begins some stop string."""
        if not self.buffer:
            return 0
        last, held = self.buffer[-1], 0
        for s, ends in zip(self.stop, self._prefixes, strict=True):
            held = max(held, next((n for n in ends.get(last, ()) if n <= len(self.buffer) and self.buffer.endswith(s[:n])), 0))
        return held

    def _release(self, upto: int) -> str:
        piece = self.buffer[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece
