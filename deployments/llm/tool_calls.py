"""Tool calls in a model's own syntax: the formats (Hermes/Qwen, Llama 3 JSON, Mistral), the grammar
that forces a valid call, and the parsers that turn a reply, whole or streamed, into tool calls.

Pure text and JSON: the grammar is a plain xgrammar structural-tag dict that structured.py compiles.
Must not import torch or xgrammar.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from deployments.types import ToolCall, ToolCallDelta, ToolSpec

ParserName = Literal["hermes", "llama3_json", "mistral"]

_NAME_AND_ARGS = r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*'
_JSON = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls.

    A reply's tool-call part starts at one of `opens`; each call is `call_begin(name)`, the arguments'
    JSON object, then `call_end`; several calls are joined by `separator`, and the whole list is
    wrapped in `list_begin` ... `list_end` (Mistral's JSON array)."""

    name: ParserName
    opens: tuple[str, ...]              # text that starts the tool-call part of a reply
    header: re.Pattern                  # a call up to its arguments' value; group 1 is the name (JSON string)
    args_key: str
    call_prefix: str                    # text before `{"name": ...`
    call_end: str                       # text after the arguments object
    separator: str
    list_begin: str = ""
    list_end: str = ""
    parse: Callable[[str], tuple[Optional[str], list[ToolCall]]] = None   # type: ignore[assignment]

    def call_begin(self, name: str) -> str:
        return self.call_prefix + '{"name": ' + json.dumps(name) + f', "{self.args_key}": '

    def example(self) -> str:
        """One call written out, for the system prompt of a template that does not know tools."""
        return self.list_begin + self.call_begin("f") + '{"x": 1}}' + self.call_end + self.list_end

    def structural_tag(self, tools: ToolSpec) -> dict[str, Any]:
        """An xgrammar structural tag that admits only well-formed calls whose arguments match each
        function's `parameters` schema: exactly one call of the named function, or for "required"
        one or more calls (exactly one when parallel tool calls are off)."""
        functions = [t["function"] for t in tools.tools]
        if tools.choice not in ("auto", "required"):
            functions = [f for f in functions if f["name"] == tools.choice]
        tags = [{"type": "tag", "begin": self.call_begin(f["name"]),
                 "content": {"type": "json_schema", "json_schema": arguments_schema(f)},
                 "end": "}" + self.call_end} for f in functions]
        calls: dict[str, Any] = {"type": "tags_with_separator", "tags": tags, "separator": self.separator,
                                 "at_least_one": True,
                                 "stop_after_first": tools.choice != "required" or not tools.parallel}
        if self.list_begin:
            calls = {"type": "sequence", "elements": [{"type": "const_string", "value": self.list_begin}, calls,
                                                      {"type": "const_string", "value": self.list_end}]}
        return {"type": "structural_tag", "format": calls}


def arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema a call's arguments must match; no `parameters` means no arguments (OpenAI)."""
    params = function.get("parameters")
    return {"type": "object", "properties": {}} if params is None else params


# ----------------------------------------------------------------------------- parsing whole replies

_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call_from(obj: Any) -> Optional[ToolCall]:
    """A ToolCall from a decoded `{"name": ..., "arguments"|"parameters": ...}`, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(new_call_id(), obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def parse_hermes(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """`<tool_call>{json}</tool_call>` blocks; a block that is not a valid call stays content."""
    calls, spans = [], []
    for match in _HERMES_BLOCK.finditer(text):
        try:
            call = _call_from(json.loads(match.group(1)))
        except ValueError:
            continue
        if call is not None:
            calls.append(call)
            spans.append(match.span())
    if not calls:
        return text, []
    rest = "".join(text[a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)]))
    return (rest.strip() or None), calls


def _json_calls(text: str, start: int, between: str) -> Optional[list[ToolCall]]:
    """Consecutive call objects from `start`, separated by characters of `between`; None unless the
    rest of the text is exactly that."""
    calls, at = [], start
    while True:
        while at < len(text) and text[at] in between:
            at += 1
        if at == len(text):
            return calls or None
        try:
            obj, at = _JSON.raw_decode(text, at)
        except ValueError:
            return None
        call = _call_from(obj)
        if call is None:
            return None
        calls.append(call)


def parse_llama3_json(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """A reply that is one or more `{"name": ..., "parameters": {...}}` objects (optionally after
    `<|python_tag|>`, joined by `;` or newlines) is tool calls; anything else is content."""
    body = text.strip()
    start = len("<|python_tag|>") if body.startswith("<|python_tag|>") else 0
    calls = _json_calls(body, start, " \n\t;")
    return (text, []) if calls is None else (None, calls)


def parse_mistral(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`. The marker is a special token that
    detokenization may drop, so a reply that is a bare array of calls counts too."""
    at = text.find("[TOOL_CALLS]")
    head, body = (text[:at], text[at + len("[TOOL_CALLS]"):]) if at >= 0 else ("", text)
    body = body.strip()
    if not body.startswith("["):
        return text, []
    try:
        items, end = _JSON.raw_decode(body)
    except ValueError:
        items, end = None, 0
    calls = [_call_from(o) for o in items] if isinstance(items, list) else []
    if not calls or None in calls or body[end:].strip():
        return text, []
    return (head.strip() or None), calls   # type: ignore[return-value]


FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", ("<tool_call>",), re.compile(r"<tool_call>\s*" + _NAME_AND_ARGS), "arguments",
                         "<tool_call>\n", "\n</tool_call>", "\n", parse=parse_hermes),
    "llama3_json": ToolFormat("llama3_json", ("<|python_tag|>", '{"name"'), re.compile(_NAME_AND_ARGS), "parameters",
                              "", "", "; ", parse=parse_llama3_json),
    "mistral": ToolFormat("mistral", ("[TOOL_CALLS]", '[{"name"'), re.compile(_NAME_AND_ARGS), "arguments",
                          "", "", ", ", list_begin="[TOOL_CALLS][", list_end="]", parse=parse_mistral),
}


def default_parser(chat_template: Optional[str]) -> ParserName:
    """The family a chat template writes tool calls in; Hermes (the system-prompt format) otherwise."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "<|eom_id|>" in template:
        return "llama3_json"
    return "hermes"


# ----------------------------------------------------------------------------- streaming

@dataclass
class _Streamed:
    id: str
    name: str
    start: int          # where its arguments begin in the held text
    sent: int = 0       # characters of arguments streamed so far
    done: bool = False  # its arguments value is complete


class ToolCallStream:
    """Splits one choice's streamed reply into content and tool calls as they are generated.

    Content streams until the format's tool-call part opens (a tail that could still grow into the
    opening is held back). From there on, text is held; as soon as a call's name is known its first
    delta (id, name) goes out, then its arguments in fragments as they are generated, up to the end
    of the arguments' JSON value. At the end the held text is parsed whole: calls that did not
    stream (another layout) are sent then, and held text that is no tool call comes back as content."""

    def __init__(self, fmt: ToolFormat = FORMATS["hermes"]):
        self._fmt = fmt
        self._held = ""
        self._pending = ""            # content not yet released: may be the start of the opening
        self._in_call = False
        self._calls: list[_Streamed] = []
        self._cursor = 0              # the next call's header is looked for from here

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Feeds generated text; returns the content and the tool-call deltas to stream now."""
        out = ""
        if self._in_call:
            self._held += text
        else:
            self._pending += text
            at = min((i for i in (self._pending.find(o) for o in self._fmt.opens) if i >= 0), default=-1)
            if at >= 0:
                out, self._held, self._pending, self._in_call = self._pending[:at], self._pending[at:], "", True
            else:
                keep = max(_partial_length(self._pending, o) for o in self._fmt.opens)
                out = self._pending[:len(self._pending) - keep]
                self._pending = self._pending[len(out):]
        return out, (self._advance() if self._in_call else [])

    def finish(self, cut: bool = False) -> tuple[str, list[ToolCall], list[ToolCallDelta]]:
        """At the end of the reply: (remaining content, the calls, the deltas not yet sent). With `cut`
        (max_tokens ended it), held text that is not a complete call is an unfinished call, not content."""
        if not self._in_call:
            out, self._pending = self._pending, ""
            return out, [], []
        content, parsed = self._fmt.parse(self._held)
        calls = [ToolCall(s.id, s.name, parsed[i].arguments if i < len(parsed) else self._args(s))
                 for i, s in enumerate(self._calls)]
        deltas = []
        for i, s in enumerate(self._calls):   # arguments that could not stream (a JSON string, a bare value)
            sent = self._args(s)
            if not s.done and i < len(parsed) and parsed[i].arguments.startswith(sent) and parsed[i].arguments != sent:
                deltas.append(ToolCallDelta(i, None, None, parsed[i].arguments[len(sent):]))
        for i, c in enumerate(parsed[len(calls):], start=len(calls)):
            calls.append(c)
            deltas.append(ToolCallDelta(i, c.id, c.name, c.arguments))
        self._held = ""
        if not calls:
            return ("" if cut else content or ""), [], []
        cut = cut or len(parsed) < len(self._calls)    # a call cut short: the held text is no content
        return "" if cut else content or "", calls, deltas

    def _advance(self) -> list[ToolCallDelta]:
        deltas = []
        while True:
            call = self._calls[-1] if self._calls and not self._calls[-1].done else None
            if call is None:
                m = self._fmt.header.search(self._held, self._cursor)
                if m is None:
                    return deltas
                try:
                    name = json.loads(m.group(1))
                except ValueError:
                    return deltas
                call = _Streamed(new_call_id(), name, m.end())
                self._calls.append(call)
                deltas.append(ToolCallDelta(len(self._calls) - 1, call.id, name, ""))
            while not call.sent and call.start < len(self._held) and self._held[call.start].isspace():
                call.start += 1   # the header matched before the whitespace that leads the value
            if self._held[call.start:call.start + 1] not in ("", "{", "["):
                return deltas     # arguments given as a JSON string or a bare value: sent whole at the end
            end = self._value_end(call.start)
            upto = len(self._held) if end is None else end
            if upto > call.start + call.sent:
                deltas.append(ToolCallDelta(len(self._calls) - 1, None, None, self._held[call.start + call.sent:upto]))
                call.sent = upto - call.start
            if end is None:
                return deltas
            call.done, self._cursor = True, end

    def _value_end(self, start: int) -> Optional[int]:
        """End of the JSON value at `start` once it is complete; None while it may still grow."""
        if start >= len(self._held):
            return None
        try:
            return _JSON.raw_decode(self._held, start)[1]
        except ValueError:
            return None

    def _args(self, call: _Streamed) -> str:
        return self._held[call.start:call.start + call.sent]


def _partial_length(text: str, opening: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `opening`."""
    for n in range(min(len(opening) - 1, len(text)), 0, -1):
        if opening.startswith(text[-n:]):
            return n
    return 0
