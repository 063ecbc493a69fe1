"""POST /v1/chat/completions: request model, conversion to a GenerateRequest, response shapes.

Tools are checked here: names, and `parameters` as JSON Schema (schema.py)."""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import Field, StrictBool, model_validator

from deployments.errors import InvalidRequestError, UnsupportedParameterError
from deployments.types import (ChatTemplateOptions, Choice, ChoiceDelta, GenerateChunk, GenerateRequest, TokenLogprob,
                               ToolCall, ToolSpec, Usage)
from deployments.config import RequestLimits
from ingress.protocol.common import ChatNoOpFields, SamplingFields, WireModel, check_depth, over_limit
from ingress.protocol.schema import check_json_schema


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(WireModel):
    name: str
    arguments: str


class ToolCallIn(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class Message(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None

    def text_length(self) -> int:
        """Characters of prompt text this message carries (content, and any tool call arguments)."""
        content = self.content or ""
        n = len(content) if isinstance(content, str) else sum(len(p.text) for p in content)
        return n + sum(len(c.function.arguments) for c in self.tool_calls or ())

    @model_validator(mode="after")
    def _shape(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class FunctionDef(WireModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


def check_conversation_limits(messages: list[Message], tools: Optional[list[Tool]], limits: RequestLimits) -> None:
    """The caps on what a chat prompt is rendered from (chat completions and /tokenize alike)."""
    if len(messages) > limits.max_messages:
        raise over_limit("messages", "the number of messages", limits.max_messages, "max_messages")
    if sum(m.text_length() for m in messages) > limits.max_prompt_chars:
        raise over_limit("messages", "the prompt's length in characters", limits.max_prompt_chars, "max_prompt_chars")
    if len(tools or ()) > limits.max_tools:
        raise over_limit("tools", "the number of tools", limits.max_tools, "max_tools")
    for i, tool in enumerate(tools or ()):
        check_depth(tool.function.parameters, f"tools[{i}].function.parameters")


class ChatTemplateFields(WireModel):
    """vLLM's chat-template fields (chat completions and /tokenize): `continue_final_message` leaves
    the last message open so the reply continues it (an assistant prefill), and
    `chat_template_kwargs` sets variables of the model's own template (e.g. Qwen3's
    `enable_thinking`); the model's server refuses one its template does not read."""

    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def check_template_limits(self, limits: RequestLimits) -> None:
        check_depth(self.chat_template_kwargs, "chat_template_kwargs")
        if self.chat_template_kwargs and len(dumps(self.chat_template_kwargs)) > limits.max_prompt_chars:
            raise over_limit("chat_template_kwargs", "their size in characters", limits.max_prompt_chars,
                             "max_prompt_chars")

    def check_template_fields(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidRequestError("Cannot set both 'continue_final_message' and 'add_generation_prompt' to true: "
                                      "send 'add_generation_prompt': false to continue the final message.",
                                      param="continue_final_message", code="invalid_parameter_combination")

    def template_options(self) -> Optional[ChatTemplateOptions]:
        """None when every field has its default (the typed request then stays as it was)."""
        if self.add_generation_prompt and not self.continue_final_message and not self.chat_template_kwargs:
            return None
        return ChatTemplateOptions(self.add_generation_prompt, self.continue_final_message,
                                   dict(self.chat_template_kwargs or {}))


class ChatCompletionRequest(SamplingFields, ChatNoOpFields, ChatTemplateFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    response_format: Optional[ResponseFormat] = None

    def check_limits(self, limits: RequestLimits) -> None:
        self.check_sampling_limits(limits)
        check_conversation_limits(self.messages, self.tools, limits)
        self.check_template_limits(limits)
        rf = self.response_format
        if rf is not None:
            check_depth(rf.json_schema, "response_format.json_schema")
        if rf is not None and rf.json_schema is not None and len(dumps(rf.json_schema)) > limits.max_schema_bytes:
            raise over_limit("response_format.json_schema", "the schema's size in bytes", limits.max_schema_bytes,
                             "max_schema_bytes")

    def check(self) -> None:
        self.check_common()
        self.check_no_ops()
        self.check_template_fields()
        self.check_logprob_options(bool(self.logprobs))
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.",
                                      param="top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidRequestError("Setting 'max_tokens' and 'max_completion_tokens' at the same time is not "
                                      "supported.", param="max_tokens", code="invalid_parameter_combination")
        self._check_structured_outputs()
        self._check_response_format()
        self._check_tools()
        self.check_constrained(self.max_completion_tokens or self.max_tokens, self._constrained_by())

    def _constrained_by(self) -> Optional[str]:
        """What grammar constrains the reply, named for errors: a forced tool call, response_format json or
        structured_outputs (check() lets at most one through), or None."""
        tools = self._tool_spec()
        if tools is not None and tools.choice != "auto":
            return "a forced tool call"
        if self._json_format():
            return "response_format json_object/json_schema"
        return "structured_outputs" if self.structured_outputs is not None else None

    def _json_format(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    def _check_structured_outputs(self) -> None:
        if self.structured_outputs is None:
            return
        if self._json_format():
            raise InvalidRequestError("'structured_outputs' and response_format json_object/json_schema cannot "
                                      "be combined: send one.", param="structured_outputs",
                                      code="invalid_parameter_combination")
        if self.tools and self.tool_choice != "none":
            raise UnsupportedParameterError("'structured_outputs' cannot be combined with tools on this server.",
                                            param="structured_outputs")

    def _check_response_format(self) -> None:
        rf = self.response_format
        if not self._json_format():
            return
        if self.tools and self.tool_choice != "none":
            raise UnsupportedParameterError("response_format json_object/json_schema cannot be combined with "
                                            "tools on this server.", param="response_format")
        if rf.type == "json_schema":
            spec = rf.json_schema
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
                raise InvalidRequestError("Missing required parameter: 'response_format.json_schema.name'.",
                                          param="response_format.json_schema.name", code="missing_required_parameter")
            if "schema" in spec and not isinstance(spec["schema"], dict):
                raise InvalidRequestError("Invalid type for 'response_format.json_schema.schema': expected an object.",
                                          param="response_format.json_schema.schema", code="invalid_type")
            if isinstance(spec.get("schema"), dict):
                check_json_schema(spec["schema"], "response_format.json_schema.schema", "response_format",
                                  strict=spec.get("strict") is True)

    def _response_format(self) -> Optional[dict[str, Any]]:
        """The grammar spec: response_format's, or structured_outputs' (never both: check())."""
        rf = self.response_format
        if not self._json_format():
            return self.output_constraint()
        if rf.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "schema": rf.json_schema.get("schema")}

    def _check_tools(self) -> None:
        if not self.tools:
            if self.parallel_tool_calls is not None:
                raise InvalidRequestError("Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only "
                                          "allowed when 'tools' are specified.", param="parallel_tool_calls")
            if self.tool_choice not in (None, "none"):
                raise InvalidRequestError("Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                                          "'tools' are specified.", param="tool_choice")
            return
        for i, tool in enumerate(self.tools):
            f = tool.function
            if f.parameters is not None:
                check_json_schema(f.parameters, f"tools[{i}].function.parameters", f"function '{f.name}'",
                                  strict=f.strict is True, code="invalid_function_parameters")
                if f.parameters.get("type", "object") != "object":
                    raise InvalidRequestError(f"Invalid schema for function '{f.name}': schema must be a JSON Schema "
                                              f"of 'type: \"object\"', got 'type: {json.dumps(f.parameters['type'])}'.",
                                              param=f"tools[{i}].function.parameters", code="invalid_function_parameters")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools}
            if self.tool_choice.function.name not in names:
                raise InvalidRequestError(f"Invalid value for 'tool_choice': no function named "
                                          f"'{self.tool_choice.function.name}' in 'tools'.", param="tool_choice")

    def to_generate_request(self, request_id: str) -> GenerateRequest:
        params = self.sampling_params(max_tokens=self.max_completion_tokens or self.max_tokens,
                                      logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        return GenerateRequest(request_id, params, messages=[m.model_dump(exclude_none=True) for m in self.messages],
                               tools=self._tool_spec(), response_format=self._response_format(),
                               template=self.template_options())

    def _tool_spec(self) -> Optional[ToolSpec]:
        if not self.tools or self.tool_choice == "none":
            return None
        choice = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else (
            self.tool_choice or "auto")
        return ToolSpec([t.model_dump(exclude_none=True) for t in self.tools], choice,
                        parallel=self.parallel_tool_calls is not False)

    @property
    def single_tool_call(self) -> bool:
        return self.parallel_tool_calls is False


# ----------------------------------------------------------------------------- responses

def logprobs_content(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e.top]} for e in entries]


def tool_calls_json(calls: list[ToolCall], single: bool) -> list[dict[str, Any]]:
    calls = calls[:1] if single else calls
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def event_tail(chunk: GenerateChunk, continuous: bool, plain: str) -> str:
    """How a stream event ends after its choices: `plain` (with include_usage, `"usage":null`), or with
    vLLM's continuous_usage_stats the request's usage so far."""
    so_far = (chunk.usage or chunk.usage_so_far) if continuous else None
    return plain if so_far is None else ',"usage":' + dumps(usage_json(so_far)) + "}\n\n"


def usage_json(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def choice_json(c: Choice, single_tool_call: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text if (c.text or not c.tool_calls) else None,
                               "refusal": None}
    if c.tool_calls:
        message["tool_calls"] = tool_calls_json(c.tool_calls, single_tool_call)
    logprobs = None if c.logprobs is None else {"content": logprobs_content(c.logprobs), "refusal": None}
    out = {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason}
    if c.token_ids is not None:   # vLLM's return_token_ids (the prompt's ids go on the response)
        out["token_ids"] = c.token_ids
    return out


def delta_events(d: ChoiceDelta, first: bool, with_logprobs: bool, single_tool_call: bool) -> list[dict[str, Any]]:
    """The `choices` entries one ChoiceDelta becomes: role chunk, content/tool chunk, finish chunk."""
    out = []
    if first:
        out.append({"index": d.index, "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": {"content": [], "refusal": None} if with_logprobs else None, "finish_reason": None})
    if d.text or d.logprobs:
        lp = {"content": logprobs_content(d.logprobs or []), "refusal": None} if with_logprobs else None
        out.append({"index": d.index, "delta": {"content": d.text}, "logprobs": lp, "finish_reason": None})
    for t in d.tool_call_deltas or []:
        if single_tool_call and t.index > 0:
            continue
        call: dict[str, Any] = {"index": t.index}
        if t.id is not None:
            call.update(id=t.id, type="function")
        call["function"] = {"arguments": t.arguments} if t.name is None else {"name": t.name, "arguments": t.arguments}
        out.append({"index": d.index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None})
    if d.finish_reason is not None:
        out.append({"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason})
    if d.token_ids is not None:   # vLLM's return_token_ids: the delta's tokens ride on its last event
        if not out:
            out.append({"index": d.index, "delta": {"content": ""}, "logprobs": None, "finish_reason": None})
        out[-1]["token_ids"] = d.token_ids
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
