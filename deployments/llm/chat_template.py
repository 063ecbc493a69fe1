"""Chat prompts: OpenAI messages rendered with the model's chat template.

Tools go to the template when it knows `tools`; otherwise they are described in a system message
in the model's tool-call format (tool_calls.py). Earlier turns' tool calls (with their ids) and
`role: tool` results are rendered the same two ways. Must not import torch.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Optional

from deployments.errors import InvalidRequestError
from deployments.llm.tool_calls import FORMATS, ToolFormat
from deployments.types import ChatTemplateOptions, ToolSpec

# Template variables the server sets itself; chat_template_kwargs may not override them.
_SERVER_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"})


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: Optional[ToolSpec],
                fmt: ToolFormat = FORMATS["hermes"], options: Optional[ChatTemplateOptions] = None) -> str:
    """The prompt text: by default ending with the template's generation prompt; `options` can
    leave the last message open instead, and set the template's own variables."""
    options = options or ChatTemplateOptions()
    template = tokenizer.chat_template or ""
    if not template:
        raise InvalidRequestError("This model has no chat template; use /v1/completions instead.", param="model")
    _check_template_kwargs(tokenizer, template, options.kwargs)
    native = "tools" in template
    messages = [_template_message(m, native, fmt) for m in messages]
    kwargs: dict[str, Any] = dict(options.kwargs)
    if tools is not None:
        if native:
            kwargs["tools"] = tools.tools
        else:
            messages = _with_tool_system_prompt(messages, tools.tools, fmt)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=options.add_generation_prompt,
                                             continue_final_message=options.continue_final_message,
                                             tokenize=False, **kwargs)
    except Exception as exc:  # jinja raises for message orders the template forbids
        raise InvalidRequestError(f"The messages do not fit this model's chat template: {_short(exc)}",
                                  param="messages") from None


def _check_template_kwargs(tokenizer: Any, template: str, kwargs: dict[str, Any]) -> None:
    """chat_template_kwargs must take effect: each must be a variable this model's template reads,
    and not one the server sets (the conversation, tools, generation prompt, special tokens)."""
    if not kwargs:
        return
    special = set(getattr(tokenizer, "special_tokens_map", {}) or {})
    reads, helpers = template_variables(template)
    for key in kwargs:
        if key in _SERVER_VARIABLES or key in special or key in helpers:
            raise InvalidRequestError(f"Invalid 'chat_template_kwargs': '{key}' is set by the server, not by "
                                      "chat_template_kwargs.", param="chat_template_kwargs", code="invalid_value")
        if key not in reads:
            raise InvalidRequestError(f"Invalid 'chat_template_kwargs': this model's chat template does not use "
                                      f"'{key}'.", param="chat_template_kwargs", code="invalid_value")


@functools.lru_cache(maxsize=8)
def template_variables(template: str) -> tuple[frozenset[str], frozenset[str]]:
    """The variables a Jinja chat template reads from its caller (jinja2's own analysis, in the
    environment transformers renders it in), and the helpers that environment defines."""
    import jinja2.meta
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        env = _compile_jinja_template(template).environment
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template))), frozenset(env.globals)
    except Exception:  # a template jinja cannot parse fails when it is rendered, with its own error
        return frozenset(), frozenset()


def _with_tool_system_prompt(messages: list[dict], tools: list[dict], fmt: ToolFormat) -> list[dict]:
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    text = ("You may call one or more functions to help with the user query. The functions are:\n"
            f"<tools>\n{listing}\n</tools>\n"
            f"To call a function, reply with its name and arguments, for example:\n{fmt.example()}")
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def _template_message(msg: dict[str, Any], native: bool, fmt: ToolFormat) -> dict[str, Any]:
    """OpenAI message -> template message: text parts joined; tool calls and results passed to a
    template that knows them, else written out in the model's format."""
    role = "system" if msg["role"] == "developer" else msg["role"]
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    out: dict[str, Any] = {"role": role, "content": content or ""}
    calls = msg.get("tool_calls") or []
    if calls and native:
        out["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
            "name": c["function"]["name"], "arguments": _json_or_text(c["function"]["arguments"])}} for c in calls]
    elif calls:
        out["content"] += _written_calls(calls, fmt)
    if role == "tool" and native:
        out["tool_call_id"] = msg.get("tool_call_id")
    elif role == "tool":
        out = {"role": "tool", "content": f"<tool_response>\n{out['content']}\n</tool_response>"}
    return out


def _written_calls(calls: list[dict], fmt: ToolFormat) -> str:
    """Earlier calls as the model would have written them."""
    bodies = [fmt.call_begin(c["function"]["name"]) + json.dumps(_json_or_text(c["function"]["arguments"]),
                                                                 ensure_ascii=False) + "}" + fmt.call_end
              for c in calls]
    return fmt.list_begin + fmt.separator.join(bodies) + fmt.list_end


def _json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return s


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
