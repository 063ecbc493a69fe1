"""Structured output (`response_format` json_object / json_schema) with xgrammar.

xgrammar compiles a JSON schema (or its built-in JSON grammar) against the tokenizer's vocabulary
once; each sequence then gets its own GrammarMatcher. Before sampling, the matcher of every
constrained row fills its row of a token bitmask, and the masked-out logits become -inf, so greedy
and sampled choices alike can only produce text the grammar accepts; after sampling the matcher
accepts the chosen token, and the sequence stops once the grammar is complete (the only token left
is EOS). xgrammar's compiler caches compiled grammars by schema. xgrammar is optional: without it a
request with response_format json gets a 400 that says so.
"""
from __future__ import annotations

import json
import re
import threading
from typing import Any, Optional

import torch

from deployments.errors import InvalidRequestError, UnsupportedParameterError

_CACHE_BYTES = 256 << 20   # compiled grammars kept by xgrammar's compiler cache


class Grammars:
    """Compiles grammars for one tokenizer. xgrammar's compiler caches what it compiled (by schema)
    and is thread-safe; compiles run off the event loop."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer, self._vocab_size, self._stop = tokenizer, vocab_size, stop_token_ids
        self._compiler = None
        self._lock = threading.Lock()

    def compile(self, response_format: dict[str, Any]) -> Any:
        compiler = self._get_compiler()
        schema = response_format.get("schema")
        try:
            if response_format["type"] == "json_schema" and schema is not None:
                return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            return compiler.compile_builtin_json_grammar()
        except Exception as exc:  # xgrammar reports bad schemas as RuntimeError/ValueError
            raise InvalidRequestError(f"Invalid JSON schema in 'response_format': {_reason(exc)}",
                                      param="response_format") from None

    @classmethod
    def for_engine(cls, engine: Any) -> "Grammars":
        """Grammars over the engine's tokenizer, vocabulary and stop tokens."""
        return cls(engine.tokenizer, engine.sampler.vocab_size, sorted(engine.eos_ids))

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop)
                self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=_CACHE_BYTES)
            return self._compiler


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location ('[time] path.cc:123: ')."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", line)[:300]


def new_matcher(grammar: Optional[Any]) -> Optional[Any]:
    return None if grammar is None else _xgrammar().GrammarMatcher(grammar)


def apply_grammars(logits: torch.Tensor, seqs: list) -> None:
    """Masks, in place, the tokens each constrained row's grammar does not allow next. logits [B, V]."""
    rows = [r for r, s in enumerate(seqs) if s.matcher is not None]
    if not rows:
        return
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[1])
    for r in rows:
        seqs[r].matcher.fill_next_token_bitmask(bitmask, r)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise UnsupportedParameterError(
            "response_format json_object/json_schema needs the 'xgrammar' package on the server "
            "(pip install xgrammar).", param="response_format") from None
    return xgrammar
