"""The chat request model's tool checks, through the in-process HTTP layer: every bad tool is a 400
naming the parameter; good tools reach the model as a ToolSpec."""
from __future__ import annotations

import pytest

from tests.unit.fakes import FakeChatClient
from tests.unit.test_api import CHAT, make_app, raw_client, run

USER = [{"role": "user", "content": "x"}]


def _fn(name="f", **kw):
    return {"type": "function", "function": {"name": name, **kw}}


@pytest.mark.parametrize("tools,extra,param,code", [
    ([_fn("get weather")], {}, "tools[0].function.name", "invalid_value"),
    ([_fn("x" * 65)], {}, "tools[0].function.name", "invalid_value"),
    ([_fn("")], {}, "tools[0].function.name", "invalid_value"),
    ([_fn("ok"), _fn("f", parameters={"type": "object", "properties": {"a": {"type": "strng"}}})], {},
     "tools[1].function.parameters", "invalid_function_parameters"),
    ([_fn(parameters={"type": "object", "required": "a"})], {}, "tools[0].function.parameters",
     "invalid_function_parameters"),
    ([_fn(parameters={"type": "string"})], {}, "tools[0].function.parameters", "invalid_function_parameters"),
    ([_fn(strict=True, parameters={"type": "object", "properties": {"a": {"not": {"type": "integer"}}}})], {},
     "tools[0].function.parameters", "invalid_function_parameters"),
    ([_fn("f")], {"tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", None),
    (None, {"tool_choice": "required"}, "tool_choice", None),
])
def test_bad_tools_are_a_400_naming_the_parameter(tools, extra, param, code):
    body = {"model": CHAT, "messages": USER, **({"tools": tools} if tools is not None else {}), **extra}

    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/chat/completions", json=body)
    r = run(go())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")


def test_strict_false_accepts_keywords_the_grammar_cannot_enforce():
    """Only strict functions promise the whole schema; others get what the grammar enforces."""
    client = FakeChatClient()
    tools = [_fn(parameters={"type": "object", "properties": {"a": {"not": {"type": "integer"}}}})]

    async def go():
        async with raw_client(make_app(client)) as h:
            return await h.post("/v1/chat/completions", json={"model": CHAT, "messages": USER, "tools": tools})
    assert run(go()).status_code == 200


@pytest.mark.parametrize("extra,choice,parallel", [
    ({}, "auto", True),
    ({"tool_choice": "required", "parallel_tool_calls": False}, "required", False),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "f", True),
])
def test_tools_reach_the_model_with_the_choice_and_the_parallel_rule(extra, choice, parallel):
    client = FakeChatClient()
    tools = [_fn(strict=True, parameters={"type": "object", "properties": {"a": {"type": "integer"}},
                                          "required": ["a"], "additionalProperties": False})]

    async def go():
        async with raw_client(make_app(client)) as h:
            return await h.post("/v1/chat/completions", json={"model": CHAT, "messages": USER, "tools": tools, **extra})
    assert run(go()).status_code == 200
    spec = client.requests[-1].tools
    assert (spec.choice, spec.parallel) == (choice, parallel) and spec.tools[0]["function"]["strict"] is True


def test_a_response_format_schema_that_is_no_json_schema_is_a_400():
    body = {"model": CHAT, "messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"a": {"minimum": "zero"}}}}}}

    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/chat/completions", json=body)
    r = run(go())
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
