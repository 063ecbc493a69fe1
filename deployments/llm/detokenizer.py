"""Incremental detokenization and stop-string matching for one sequence.

Text is decoded over a short window of recent tokens, and a delta is released only once it no
longer ends in an incomplete UTF-8 character. Stop strings are cut out of the text; a tail that
could still grow into a stop string is held back from the stream until it is decided.
"""
from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], context: int = 5):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-context:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the newly complete text (maybe '')."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        full_text = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text):]


class StopMatcher:
    """Accumulates the output text, cuts it at the first stop string, and says what is safe to stream."""

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.stopped = False
        self._sent = 0

    def append(self, delta: str) -> bool:
        """Adds text; returns True when a stop string was found (the text is then cut before it)."""
        if self.stopped or not delta:
            return self.stopped
        start = max(0, len(self.text) - self._longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def take_ready(self, final: bool) -> str:
        """Text not yet streamed that can no longer turn into part of a stop string."""
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_tail()
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent:end], end
        return out

    def _held_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    @property
    def sent(self) -> int:
        return self._sent


def token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """The text and raw bytes one token stands for (for logprobs)."""
    text = tokenizer.decode([token_id])
    return text, list(text.encode("utf-8", errors="replace"))


