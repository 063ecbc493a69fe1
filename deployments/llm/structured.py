"""Constrained decoding with xgrammar: `response_format` json_object / json_schema, vLLM's
`structured_outputs` (json, regex, choice, grammar, json_object, structural_tag), and forced tool
calls (a structural tag built by tool_calls.py).

xgrammar compiles a JSON schema (json_object: any JSON object), regex or grammar against the
tokenizer's vocabulary once; each sequence then gets its own GrammarMatcher. Before sampling, the
matcher of every constrained row fills its row of a token bitmask, and the masked-out logits become
-inf, so greedy and sampled choices alike can only produce text the grammar accepts; after sampling
the matcher accepts the chosen token, and the sequence stops once the grammar is complete (the only
token left is EOS). xgrammar's compiler caches compiled grammars by schema, grammar text and
structural tag. xgrammar is optional: without it a request that needs a grammar gets a 400 that
says so.
"""
from __future__ import annotations

import functools
import json
import re
import threading
from typing import Any, Optional

import torch

from deployments.errors import InvalidRequestError, UnsupportedParameterError
from deployments.types import constraint_param

_CACHE_BYTES = 256 << 20   # compiled grammars kept by xgrammar's compiler cache
_ANY_OBJECT = '{"type": "object"}'   # what json_object asks for


class Grammars:
    """Compiles grammars for one tokenizer. xgrammar's compiler caches what it compiled (by schema)
    and is thread-safe; compiles run off the event loop."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], tokenizer_info: Any = None):
        self._tokenizer, self._vocab_size, self._stop = tokenizer, vocab_size, stop_token_ids
        self._info = tokenizer_info   # an xgrammar TokenizerInfo; default: from the HF tokenizer
        self._compiler = None
        self._lock = threading.Lock()

    def compile(self, spec: dict[str, Any]) -> Any:
        """spec: {"type": "json_object"}, {"type": "json_schema", "schema": ...} (response_format or
        structured_outputs.json), {"type": "regex", "regex": ...}, {"type": "choice", "choice": [...]},
        {"type": "grammar", "grammar": ...} (structured_outputs) or {"type": "structural_tag",
        "format": ...} (forced tool calls). A spec's optional "param" names the request field in errors."""
        param = constraint_param(spec)
        compiler = self._get_compiler(param)
        kind, schema = spec["type"], spec.get("schema")
        # how JSON is written: single spaces after ',' and ':', nothing unasked for, unless
        # structured_outputs' disable_any_whitespace / disable_additional_properties say otherwise
        style = (spec.get("any_whitespace", False), spec.get("strict", True))
        try:
            if kind == "structural_tag":   # a forced tool call's, or structured_outputs'
                return compiler.compile_structural_tag(_compact_json({"type": kind, "format": spec["format"]}, style))
            if kind == "regex":
                return compiler.compile_regex(spec["regex"])
            if kind == "choice":
                return compiler.compile_grammar(_choice_ebnf(spec["choice"]))
            if kind == "grammar":   # vLLM's rule: EBNF (GBNF) has '::=', anything else is Lark
                text = spec["grammar"]
                return compiler.compile_grammar(text) if "::=" in text else compiler.compile_lark(text)
            if kind == "json_schema" and schema is not None:
                return compiler.compile_grammar(_schema_ebnf(json.dumps(schema), param, *style))
            # json_object, or a json_schema without a schema: a JSON object (OpenAI's JSON mode, vLLM's
            # json_object), not any JSON value: a weak model otherwise answers "[null]"
            return compiler.compile_grammar(_schema_ebnf(_ANY_OBJECT, param, *style))
        except Exception as exc:  # xgrammar reports bad schemas, regexes and grammars as RuntimeError/ValueError
            what = {"regex": "regular expression", "choice": "choice", "grammar": "grammar",
                    "structural_tag": "structural tag"}.get(kind, "JSON schema")
            raise InvalidRequestError(f"Invalid {what} in '{param}': {_reason(exc)}", param=param) from None

    @classmethod
    def for_engine(cls, engine: Any) -> "Grammars":
        """Grammars over the engine's tokenizer, vocabulary and stop tokens."""
        return cls(engine.tokenizer, engine.vocab_size, sorted(engine.eos_ids))

    def _get_compiler(self, param: str):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar(param)
                info = self._info or xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop)
                self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=_CACHE_BYTES)
            return self._compiler


def _choice_ebnf(choices: list[str]) -> str:
    """A grammar whose only sentences are `choices`, each written as an EBNF string literal (JSON's
    escapes, non-ASCII kept as is: xgrammar reads no surrogate pairs)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _compact_json(node: Any, style: tuple[bool, bool] = (False, True)) -> Any:
    """The structural tag with each JSON-schema part as a grammar that writes JSON with single
    spaces after ',' and ':' (as response_format does), not any whitespace anywhere: a weak model
    would otherwise fill its calls with runs of whitespace. `style`: _schema_ebnf's any_whitespace
    and strict."""
    if isinstance(node, list):
        return [_compact_json(x, style) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and "json_schema" in node:   # without one: xgrammar says what is wrong
        schema = json.dumps(node["json_schema"])   # not sorted: the key order is the order properties are written in
        return {"type": "grammar", "grammar": _schema_ebnf(schema, "tools", *style)}
    return {k: _compact_json(v, style) for k, v in node.items()}


# xgrammar 0.2.8 writes the characters of a string with minLength/maxLength as this class, which lets
# raw control characters through (invalid JSON: they must be escaped); its plain strings exclude them.
_LOOSE_CHARS = r'[^\"\\\r\n]'
_JSON_CHARS = r'[^\0-\x1f\"\\]'


@functools.lru_cache(maxsize=1024)
def _schema_ebnf(schema: str, param: str = "tools", any_whitespace: bool = False, strict: bool = True) -> str:
    """The grammar of JSON text matching `schema`: single spaces after ',' and ':' (any whitespace
    between tokens with `any_whitespace`); with `strict`, no property or item the schema does not
    name (unless it allows them itself)."""
    ebnf = str(_xgrammar(param).Grammar.from_json_schema(schema, any_whitespace=any_whitespace, strict_mode=strict))
    return ebnf.replace(_LOOSE_CHARS, _JSON_CHARS)


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location ('[time] path.cc:123: ') or internal
    assertion ('Check failed: (...) is false: ')."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    line = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", line)
    return re.sub(r"^Check failed: \(.*?\) is false:\s*", "", line)[:300]


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


def _xgrammar(param: str = "response_format"):
    try:
        import xgrammar
    except ImportError:
        what = {"tools": "tool_choice required or a named function", "structured_outputs": "structured_outputs"}.get(
            param, "response_format json_object/json_schema")
        raise UnsupportedParameterError(f"{what} needs the 'xgrammar' package on the server (pip install xgrammar).",
                                        param="tool_choice" if param == "tools" else param) from None
    return xgrammar
