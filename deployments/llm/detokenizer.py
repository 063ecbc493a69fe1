"""Incremental detokenization and stop-string matching for one sequence.

Text is decoded over a short window of recent tokens, and a delta is released only once it no
longer ends in an incomplete UTF-8 character. Stop strings are cut out of the text; a tail that
could still grow into a stop string is held back from the stream until it is decided.
"""
from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], context: int = 5, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens   # special tokens' text left out (vLLM's default)
        self._ids = list(prompt_ids[-context:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the newly complete text (maybe '')."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        full_text = decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text):]


class StopMatcher:
    """Accumulates the output text, cuts it at the first stop string (after it, with `include`:
    vLLM's include_stop_str_in_output), and says what is safe to stream."""

    def __init__(self, stops: list[str], include: bool = False):
        self._stops = [s for s in stops if s]
        self._include = include
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.stopped = False
        self._sent = 0

    def append(self, delta: str, check: bool = True) -> bool:
        """Adds text; returns True when a stop string was found (the text is then cut before it).
        check=False (before min_tokens) adds it without looking for stop strings."""
        if self.stopped or not delta:
            return self.stopped
        start = max(0, len(self.text) - self._longest + 1)
        self.text += delta
        if not check:
            return False
        hits = [(i, -len(s)) for s in self._stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            at, minus_len = min(hits)   # the first stop string to start; of those, the longest
            self.text = self.text[:at - minus_len if self._include else at]
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


class TokenText:
    """The text and raw bytes a token stands for (for logprobs), per tokenizer. What it needs of
    the tokenizer (special ids, byte-level or not) is read once here, and each token's answer is
    cached, so logprobs cost no tokenizer work after a token's first use.

    A token can be part of a UTF-8 character: its text is then the replacement character, and its
    bytes come from the vocabulary piece itself (byte-level BPE maps each byte to one character;
    SentencePiece byte fallback spells a byte as <0xNN>), so the bytes of consecutive tokens join
    into the real text."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = backend is not None and '"ByteLevel"' in backend.to_str()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id])
            raw = self._piece_bytes(token_id)
            hit = self._cache[token_id] = (text, list(raw if raw is not None else text.encode("utf-8", errors="replace")))
        return hit

    def _piece_bytes(self, token_id: int) -> bytes | None:
        convert = getattr(self._tokenizer, "convert_ids_to_tokens", None)
        if convert is None or token_id in self._special:
            return None
        piece = convert(token_id)
        if not isinstance(piece, str) or not piece:
            return None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return None
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return None


def token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """One-off form of TokenText (the engine keeps one TokenText per tokenizer)."""
    return TokenText(tokenizer)(token_id)


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character map, inverted (the map every byte-level BPE uses)."""
    if not _BYTE_DECODER:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        _BYTE_DECODER.update({c: b for b, c in bytes_to_unicode().items()})
    return _BYTE_DECODER
