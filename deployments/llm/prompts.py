"""Chat prompts: render OpenAI messages with the model's chat template, and tool calling.

Tools are offered in the Hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`)
that most open chat models are trained on: through the template when it knows `tools`, else as a
system message. `tool_choice` takes effect by forcing the start of the reply: "required" forces a
tool call, a named function forces that function. Replies are parsed back into `tool_calls`.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from deployments.errors import InvalidRequestError
from deployments.types import ToolCall, ToolCallDelta, ToolSpec

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: Optional[ToolSpec]) -> tuple[str, str]:
    """Returns (prompt text, forced reply prefix). The prefix is part of the prompt and of the reply."""
    template = tokenizer.chat_template or ""
    if not template:
        raise InvalidRequestError("This model has no chat template; use /v1/completions instead.", param="model")
    messages = [_plain_message(m, native_tools=tools is not None and "tools" in template) for m in messages]
    kwargs: dict[str, Any] = {}
    if tools is not None:
        if "tools" in template:
            kwargs["tools"] = tools.tools
        else:
            messages = _with_tool_system_prompt(messages, tools.tools)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    except Exception as exc:  # jinja raises for message orders the template forbids
        raise InvalidRequestError(f"The messages do not fit this model's chat template: {_short(exc)}",
                                  param="messages") from None
    prefix = _forced_prefix(tools)
    return text + prefix, prefix


def parse_tool_calls(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """Splits a reply into (content, tool calls). A block that is not valid JSON stays content."""
    calls, spans = [], []
    for match in _TOOL_CALL.finditer(text):
        try:
            obj = json.loads(match.group(1))
            name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(name, str):
            continue
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, arguments))
        spans.append(match.span())
    if not calls:
        return text, []
    rest = "".join(text[a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)]))
    return (rest.strip() or None), calls


def _forced_prefix(tools: Optional[ToolSpec]) -> str:
    if tools is None or tools.choice == "auto":
        return ""
    if tools.choice == "required":
        return '<tool_call>\n{"name": "'
    return '<tool_call>\n{"name": ' + json.dumps(tools.choice) + ', "arguments": '


def _with_tool_system_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    text = ("You may call one or more functions to help with the user query. The functions are:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a function, reply with a JSON object with its name and arguments inside "
            '<tool_call></tool_call> tags, for example:\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def _plain_message(msg: dict[str, Any], native_tools: bool) -> dict[str, Any]:
    """OpenAI message -> template message: text parts joined, tool calls kept or written out."""
    role = "system" if msg["role"] == "developer" else msg["role"]
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    out: dict[str, Any] = {"role": role, "content": content or ""}
    calls = msg.get("tool_calls") or []
    if calls and native_tools:
        out["tool_calls"] = [{"type": "function", "function": {
            "name": c["function"]["name"], "arguments": _json_or_text(c["function"]["arguments"])}} for c in calls]
    elif calls:
        out["content"] += "".join(
            "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                          "arguments": _json_or_text(c["function"]["arguments"])}) + "\n</tool_call>"
            for c in calls)
    if role == "tool" and not native_tools:
        out = {"role": "tool", "content": f"<tool_response>\n{out['content']}\n</tool_response>"}
    elif role == "tool":
        out["tool_call_id"] = msg.get("tool_call_id")
    return out


def _json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return s


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


_OPEN = "<tool_call>"


_HEADER = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_JSON = json.JSONDecoder()


@dataclass
class _Streamed:
    id: str
    name: str
    start: int          # where its arguments begin in the held text
    sent: int = 0       # characters of arguments streamed so far
    done: bool = False  # its arguments value is complete


class ToolCallStream:
    """Splits one choice's streamed reply into content and tool calls as they are generated.

    Content streams until a `<tool_call>` tag starts (a tail that could still grow into the tag is
    held back). From the tag on, text is held; as soon as a call's name is known its first delta
    (id, name) goes out, then its arguments in fragments as they are generated, up to the end of the
    arguments' JSON value (`{"name": ..., "arguments": <value>}`, the Hermes format of the system
    prompt and of Qwen-style templates). At the end the held text is parsed whole: calls that did not
    stream (another layout) are sent then, and held text that is no tool call comes back as content.
    A reply that starts with a forced prefix (tool_choice required or named) starts inside a call."""

    def __init__(self, prefix: str = ""):
        self._held = prefix
        self._pending = ""            # content not yet released: may be the start of the tag
        self._in_call = bool(prefix)
        self._calls: list[_Streamed] = []
        self._cursor = 0              # the next call's header is looked for from here

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Feeds generated text; returns the content and the tool-call deltas to stream now."""
        out = ""
        if self._in_call:
            self._held += text
        else:
            self._pending += text
            at = self._pending.find(_OPEN)
            if at >= 0:
                out, self._held, self._pending, self._in_call = self._pending[:at], self._pending[at:], "", True
            else:
                keep = _partial_tag_length(self._pending)
                out = self._pending[:len(self._pending) - keep]
                self._pending = self._pending[len(out):]
        return out, (self._advance() if self._in_call else [])

    def finish(self) -> tuple[str, list[ToolCall], list[ToolCallDelta]]:
        """At the end of the reply: (remaining content, the complete calls, the deltas not yet sent)."""
        if not self._in_call:
            out, self._pending = self._pending, ""
            return out, [], []
        content, parsed = parse_tool_calls(self._held)
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
            return content or "", [], []
        return (content or "") if parsed else "", calls, deltas

    def _advance(self) -> list[ToolCallDelta]:
        deltas = []
        while True:
            call = self._calls[-1] if self._calls and not self._calls[-1].done else None
            if call is None:
                m = _HEADER.search(self._held, self._cursor)
                if m is None:
                    return deltas
                try:
                    name = json.loads(m.group(1))
                except ValueError:
                    return deltas
                call = _Streamed(f"call_{uuid.uuid4().hex[:24]}", name, m.end())
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


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of the tool-call tag."""
    for n in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-n:]):
            return n
    return 0
