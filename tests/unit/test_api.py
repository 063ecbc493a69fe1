"""The whole HTTP layer in-process with fake model clients, driven by the real `openai` client."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re

import httpx2
import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse, ImagesResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion import Completion

from deployments.config import AuthConfig, parse_app_config
from deployments.errors import ContextLengthExceededError
from ingress.api import create_api
from ingress.backends import ModelEntry, ModelRegistry
from tests.unit.fakes import FakeChatClient, FakeEmbedClient, FakeImageClient, FakeImageStore

CHAT, EMB, IMG = "fake-chat", "fake-embed", "fake-image"


def make_app(chat_client=None, auth=None, store=None, **kw):
    cfg = parse_app_config({"models": [
        {"id": CHAT, "kind": "chat", "source": "x"},
        {"id": EMB, "kind": "embedding", "source": "x"},
        {"id": IMG, "kind": "image", "source": "builtin:x", "engine": {"sizes": ["64x64", "32x32"], "max_n": 4}},
    ]})
    clients = {CHAT: chat_client or FakeChatClient(), EMB: FakeEmbedClient(), IMG: FakeImageClient()}
    registry = ModelRegistry({m.id: ModelEntry(m, clients[m.id]) for m in cfg.models})
    return create_api(registry, image_store=store or FakeImageStore(), auth=auth, **kw)


def client_for(app, api_key="test") -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=api_key, http_client=http, max_retries=0)


def raw_client(app) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")


def run(coro):
    return asyncio.run(coro)


def test_models_list_and_retrieve():
    async def go():
        c = client_for(make_app())
        models = await c.models.list()
        ids = [m.id for m in models.data]
        one = await c.models.retrieve(EMB)
        return ids, one
    ids, one = run(go())
    assert ids == [CHAT, EMB, IMG]
    assert isinstance(one, Model) and one.model_extra["embedding_dimensions"] == 8


def test_chat_plain_and_stream_shapes():
    async def go():
        c = client_for(make_app())
        plain = await c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "abc"}], n=2)
        chunks = [ch async for ch in await c.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "abc"}], stream=True,
            stream_options={"include_usage": True})]
        return plain, chunks
    plain, chunks = run(go())
    assert isinstance(plain, ChatCompletion)
    assert [ch.message.content for ch in plain.choices] == ["cba", "cba"]
    assert plain.usage.total_tokens == 3 + 6 and plain.system_fingerprint
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "cba"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_ends_with_done_and_usage_null_fields():
    async def go():
        async with raw_client(make_app()) as h:
            r = await h.post("/v1/chat/completions", json={
                "model": CHAT, "messages": [{"role": "user", "content": "ab"}], "stream": True,
                "stream_options": {"include_usage": True}})
            return r
    r = run(go())
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all("usage" in p for p in parsed)
    assert all(p["usage"] is None for p in parsed[:-1])


def test_completions_with_logprobs_offsets():
    async def go():
        c = client_for(make_app())
        return await c.completions.create(model=CHAT, prompt="xyz", logprobs=1)
    r = run(go())
    assert isinstance(r, Completion)
    assert r.choices[0].text == "zyx"
    assert r.choices[0].logprobs.text_offset == [0, 1, 2]
    assert r.choices[0].logprobs.tokens == ["z", "y", "x"]


def test_chat_tool_calls_rendered():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async def go():
        c = client_for(make_app())
        return await c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], tools=tools)
    r = run(go())
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_chat_tool_calls_stream_in_fragments_that_the_sdk_accumulates():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

    async def go(parallel):
        c = client_for(make_app())
        extra = {} if parallel else {"parallel_tool_calls": False}
        stream = await c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}],
                                                 tools=tools, stream=True, **extra)
        return [chunk async for chunk in stream]

    for parallel in (True, False):
        chunks = run(go(parallel))
        calls: dict = {}
        for chunk in chunks:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert entry["id"] is None and tc.type == "function"    # id and name come once, first
                    entry["id"], entry["name"] = tc.id, tc.function.name
                entry["arguments"] += tc.function.arguments or ""
        fragments = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert calls[0] == {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
        if parallel:
            assert len(fragments) == 4 and calls[1]["name"] == "get_time"
        else:
            assert len(fragments) == 3 and list(calls) == [0]      # parallel_tool_calls=false: the first call only


def test_embeddings_float_and_base64():
    async def go():
        c = client_for(make_app())
        b64 = await c.embeddings.create(model=EMB, input=["a", "abc"])          # client asks for base64
        flt = await c.embeddings.create(model=EMB, input="abcd", encoding_format="float")
        return b64, flt
    b64, flt = run(go())
    assert isinstance(b64, CreateEmbeddingResponse)
    assert [d.index for d in b64.data] == [0, 1]
    assert np.allclose(b64.data[1].embedding, [3.0] * 8)
    assert flt.data[0].embedding == [4.0] * 8 and flt.usage.prompt_tokens == 4


def test_the_image_store_is_deployed_only_with_an_image_model():
    from ingress.app import build_app
    chat = {"id": CHAT, "kind": "chat", "source": "x"}
    image = {"id": IMG, "kind": "image", "source": "builtin:x"}
    assert build_app({"models": [chat]})._bound_deployment.init_args[2] is None
    assert build_app({"models": [chat, image]})._bound_deployment.init_args[2] is not None


def test_response_format_without_xgrammar_is_a_400_that_says_so(monkeypatch):
    import sys

    from deployments.errors import UnsupportedParameterError
    from deployments.llm import structured
    monkeypatch.setitem(sys.modules, "xgrammar", None)     # as if it were not installed
    with pytest.raises(UnsupportedParameterError) as err:
        structured.new_matcher(object())
    assert err.value.param == "response_format" and "xgrammar" in str(err.value)


def test_image_file_without_an_image_store_is_a_404():
    cfg = parse_app_config({"models": [{"id": CHAT, "kind": "chat", "source": "x"}]})
    app = create_api(ModelRegistry({CHAT: ModelEntry(cfg.models[0], FakeChatClient())}), image_store=None)

    async def go():
        async with raw_client(app) as h:
            return await h.get("/v1/images/files/abc.png")
    resp = run(go())
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_images_b64_and_url_roundtrip_and_expiry():
    from PIL import Image
    store = FakeImageStore(ttl_s=3600)
    app = make_app(store=store)
    async def go():
        c = client_for(app)
        b64 = await c.images.generate(model=IMG, prompt="p", n=2, size="32*32", response_format="b64_json")
        url = await c.images.generate(model=IMG, prompt="p")
        async with raw_client(app) as h:
            path = url.data[0].url.removeprefix("http://test")
            ok = await h.get(path)
            for token in list(store.store._items):   # expire everything
                exp, data, subject = store.store._items[token]
                store.store._items[token] = (0.0, data, subject)
            gone = await h.get(path)
        return b64, url, ok, gone
    b64, url, ok, gone = run(go())
    assert isinstance(b64, ImagesResponse) and len(b64.data) == 2
    assert Image.open(io.BytesIO(base64.b64decode(b64.data[0].b64_json))).size == (32, 32)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(ok.content)).size == (64, 64)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, None, "model_not_found"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature",
     "decimal_above_max_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n", "integer_below_min_value"),
    ({"model": CHAT}, 400, "messages", "missing_required_parameter"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low"}, 400,
     "reasoning_effort", None),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "stream_options": {}}, 400,
     "stream_options", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "max_completion_tokens": 5},
     400, "max_tokens", "invalid_parameter_combination"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1000}}, 400,
     "logit_bias", None),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": True}, 400,
     "parallel_tool_calls", None),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
     400, "response_format.json_schema.name", "missing_required_parameter"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "response_format", "unsupported_parameter"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": "not an object"}}},
     400, "response_format.json_schema.schema", "invalid_type"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
     400, "response_format.type", "invalid_value"),
    ({"model": EMB, "messages": [{"role": "user", "content": "x"}]}, 400, "model", "model_not_supported"),
    ({"model": "", "messages": [{"role": "user", "content": "x"}]}, 400, "model", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]", "invalid_value"),
    # vLLM's sampling extensions: vLLM's ranges and rules
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "top_k": -2}, 400, "top_k",
     "integer_below_min_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "min_p": 1.5}, 400, "min_p",
     "decimal_above_max_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}, 400,
     "repetition_penalty", "decimal_below_min_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "min_tokens": 9, "max_tokens": 8}, 400,
     "min_tokens", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "min_tokens": 2,
      "response_format": {"type": "json_object"}}, 400, "min_tokens", "unsupported_parameter"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "stop_token_ids": ["1"]}, 400,
     "stop_token_ids[0]", "invalid_type"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "stop_token_ids": list(range(65))}, 400,
     "stop_token_ids", "limit_exceeded"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "ignore_eos": "yes"}, 400, "ignore_eos",
     "invalid_type"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "truncate_prompt_tokens": 0}, 400,
     "truncate_prompt_tokens", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "truncate_prompt_tokens": -2}, 400,
     "truncate_prompt_tokens", "integer_below_min_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "skip_special_tokens": 0}, 400,
     "skip_special_tokens", "invalid_type"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
     "continue_final_message", "invalid_parameter_combination"),     # add_generation_prompt is true by default
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": ["enable_thinking"]},
     400, "chat_template_kwargs", "invalid_type"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "allowed_token_ids": []}, 400,
     "allowed_token_ids", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "allowed_token_ids": [5],
      "response_format": {"type": "json_object"}}, 400, "allowed_token_ids", "unsupported_parameter"),
    # vLLM's structured_outputs: one constraint, well formed, alone
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {}}, 400,
     "structured_outputs", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "structured_outputs": {"regex": "a+", "choice": ["a"]}}, 400, "structured_outputs", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"choice": []}}, 400,
     "structured_outputs.choice", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"json_object": False}},
     400, "structured_outputs.json_object", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"json": "{not json"}},
     400, "structured_outputs.json", "invalid_type"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "structured_outputs": {"json": {"type": "objekt"}}}, 400, "structured_outputs.json", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"grammar": " "}},
     400, "structured_outputs.grammar", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "structured_outputs": {"regex": "a", "disable_any_whitespace": False}}, 400,
     "structured_outputs.disable_any_whitespace", "invalid_parameter_combination"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "structured_outputs": {"choice": ["a"], "disable_additional_properties": True}}, 400,
     "structured_outputs.disable_additional_properties", "invalid_parameter_combination"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"json": "[" * 5000}},
     400, "structured_outputs.json", "invalid_type"),   # past the JSON parser's own nesting limit
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "structured_outputs": {"structural_tag": "[" * 5000}}, 400, "structured_outputs.structural_tag", "invalid_type"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"structural_tag": "{"}},
     400, "structured_outputs.structural_tag", "invalid_type"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "structured_outputs": {"structural_tag": {"structures": [], "triggers": ["<"]}}}, 400,
     "structured_outputs.structural_tag", "invalid_value"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}],
      "structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, 400, "structured_outputs.whitespace_pattern",
     None),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "a"},
      "response_format": {"type": "json_object"}}, 400, "structured_outputs", "invalid_parameter_combination"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "a"},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "structured_outputs",
     "unsupported_parameter"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "a"},
      "min_tokens": 1}, 400, "min_tokens", "unsupported_parameter"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "a" * 70000}},
     400, "structured_outputs", "limit_exceeded"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "guided_choice": ["a", "b"]}, 400,
     "guided_choice", None),
])
def test_chat_validation_errors(body, status, param, code):
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/chat/completions", json=body)
    r = run(go())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/embeddings", {"model": EMB, "input": ""}, "input"),
    ("/v1/embeddings", {"model": EMB, "input": []}, "input"),
    ("/v1/embeddings", {"model": EMB, "input": [1, "a"]}, "input"),
    ("/v1/embeddings", {"model": EMB, "input": True}, "input"),
    ("/v1/embeddings", {"model": EMB, "input": "a", "encoding_format": "hex"}, "encoding_format"),
    ("/v1/embeddings", {"model": EMB, "input": "a", "dimensions": 0}, "dimensions"),
    ("/v1/embeddings", {"model": EMB, "input": ["a"] * 2049}, "input"),
    ("/v1/embeddings", {"model": EMB, "input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/embeddings", {"model": EMB, "input": "a", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "truncation_side": "left"}, "truncation_side"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "truncate_prompt_tokens": 2, "truncation_side": "middle"},
     "truncation_side"),
    ("/v1/images/generations", {"model": IMG, "prompt": "p", "size": "100x100"}, "size"),
    ("/v1/images/generations", {"model": IMG, "prompt": "p", "size": "big"}, "size"),
    ("/v1/images/generations", {"model": IMG, "prompt": "p", "n": 5}, "n"),
    ("/v1/images/generations", {"model": IMG, "prompt": "p", "n": 11}, "n"),
    ("/v1/images/generations", {"model": IMG, "prompt": "p", "quality": "hd"}, "quality"),
    ("/v1/completions", {"model": CHAT, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "logprobs": 6}, "logprobs"),
])
def test_other_validation_errors(path, body, param):
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post(path, json=body)
    r = run(go())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_image_size_error_lists_allowed_sizes():
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/images/generations", json={"model": IMG, "prompt": "p", "size": "1x1"})
    assert "64*64, 32*32" in run(go()).json()["error"]["message"]


def test_invalid_json_is_400_not_422():
    async def go():
        async with raw_client(make_app()) as h:
            a = await h.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
            b = await h.post("/v1/chat/completions", json=[1, 2])
            return a, b
    a, b = run(go())
    assert a.status_code == 400 and b.status_code == 400


def test_backend_typed_error_keeps_status_before_stream_starts():
    err = ContextLengthExceededError("too long", param="messages")
    async def go():
        async with raw_client(make_app(FakeChatClient(fail_with=err))) as h:
            return await h.post("/v1/chat/completions", json={
                "model": CHAT, "messages": [{"role": "user", "content": "x"}], "stream": True})
    r = run(go())
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_unexpected_error_is_500_with_request_id_and_no_internals():
    async def go():
        async with raw_client(make_app(FakeChatClient(fail_with=KeyError("secret internals")))) as h:
            return await h.post("/v1/chat/completions", json={
                "model": CHAT, "messages": [{"role": "user", "content": "x"}]}, headers={"x-request-id": "abc-123"})
    r = run(go())
    assert r.status_code == 500
    err = r.json()["error"]
    # the message names the server's own id for the request; the client's is only echoed
    assert re.search(r"Request id: req_[0-9a-f]{32}\.", err["message"])
    assert "secret" not in err["message"] and err["type"] == "server_error"
    assert r.headers["x-request-id"] == "abc-123"


def test_api_keys_checked_in_one_place(monkeypatch):
    monkeypatch.setenv("TEST_MODELHUB_KEYS", "k1,k2")
    app = make_app(auth=AuthConfig(api_keys_env="TEST_MODELHUB_KEYS"))
    async def go():
        ok = await client_for(app, api_key="k2").models.list()
        with pytest.raises(openai.AuthenticationError):
            await client_for(app, api_key="wrong").models.list()
        async with raw_client(app) as h:
            missing = await h.post("/v1/embeddings", json={"model": EMB, "input": "a"})
            health = await h.get("/health")
        return ok, missing, health
    ok, missing, health = run(go())
    assert len(ok.data) == 3
    assert missing.status_code == 401 and "API key" in missing.json()["error"]["message"]
    assert health.status_code == 200


def test_top_p_minus_one_means_no_nucleus_filtering_and_other_negatives_stay_400():
    fake = FakeChatClient()
    async def go():
        async with raw_client(make_app(fake)) as h:
            ok = await h.post("/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "x"}],
                                                            "top_p": -1})
            legacy = await h.post("/v1/completions", json={"model": CHAT, "prompt": "x", "top_p": -1.0})
            bad = await h.post("/v1/chat/completions", json={"model": CHAT, "top_p": -0.5,
                                                             "messages": [{"role": "user", "content": "x"}]})
            return ok, legacy, bad
    ok, legacy, bad = run(go())
    assert ok.status_code == 200 and legacy.status_code == 200
    assert [r.sampling.top_p for r in fake.requests] == [1.0, 1.0]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
    assert bad.json()["error"]["code"] == "decimal_below_min_value"


def test_embeddings_without_model_are_answered_by_the_first_embedding_model():
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/embeddings", json={"input": "abc", "encoding_format": "float"})
    r = run(go())
    assert r.status_code == 200, r.text
    assert r.json()["model"] == EMB and r.json()["data"][0]["embedding"] == [3.0] * 8


def test_completions_leave_the_default_length_to_the_model():
    fake = FakeChatClient()
    async def go():
        async with raw_client(make_app(fake)) as h:
            return await h.post("/v1/completions", json={"model": CHAT, "prompt": "x"})
    assert run(go()).status_code == 200
    assert fake.requests[0].sampling.max_tokens is None    # the model's default_max_tokens, else OpenAI's 16


def test_a_strict_bound_is_worded_as_strict():
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/chat/completions", json={"model": CHAT, "repetition_penalty": 0,
                                                              "messages": [{"role": "user", "content": "x"}]})
    r = run(go())
    assert r.status_code == 400 and "Expected a value > 0" in r.json()["error"]["message"]


def test_vllm_sampling_extensions_reach_the_engine():
    fake = FakeChatClient()
    extensions = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2, "stop_token_ids": [7, 9],
                  "ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True,
                  "truncate_prompt_tokens": 7, "truncation_side": "right", "allowed_token_ids": [3, 5]}
    async def go():
        async with raw_client(make_app(fake)) as h:
            chat = await h.post("/v1/chat/completions", json={"model": CHAT, **extensions,
                                                              "messages": [{"role": "user", "content": "x"}]})
            legacy = await h.post("/v1/completions", json={"model": CHAT, "prompt": "x", "top_k": -1})
            return chat, legacy
    chat, legacy = run(go())
    assert chat.status_code == 200 and legacy.status_code == 200, (chat.text, legacy.text)
    got = fake.requests[0].sampling
    assert {k: getattr(got, k) for k in extensions} == extensions
    assert fake.requests[1].sampling.top_k == 0          # -1 (vLLM's "all") is 0 to the engine
    defaults = fake.requests[1].sampling
    assert (defaults.skip_special_tokens, defaults.include_stop_str_in_output, defaults.truncate_prompt_tokens) == (
        True, False, None)


def test_structured_outputs_reach_the_engine_as_a_grammar_spec_on_both_endpoints():
    fake = FakeChatClient()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tag = {"type": "tag", "begin": "<a>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</a>"}
    legacy = {"structures": [{"begin": "<a>", "schema": schema, "end": "</a>"}], "triggers": ["<a"]}

    async def go():
        async with raw_client(make_app(fake)) as h:
            out = []
            for so in ({"choice": ["yes", "no"]}, {"regex": "[0-9]+"}, {"json": schema}, {"json": json.dumps(schema)},
                       {"grammar": 'root ::= "a"'}, {"json_object": True},
                       {"structural_tag": {"type": "structural_tag", "format": tag}},
                       {"structural_tag": json.dumps(legacy)},
                       {"json": schema, "disable_any_whitespace": False, "disable_additional_properties": False},
                       {"json_object": True, "disable_any_whitespace": True, "disable_additional_properties": True}):
                out.append(await h.post("/v1/chat/completions", json={
                    "model": CHAT, "messages": [{"role": "user", "content": "x"}], "structured_outputs": so}))
            out.append(await h.post("/v1/completions", json={"model": CHAT, "prompt": "x", "n": 2,
                                                             "structured_outputs": {"choice": ["a"]}}))
            out.append(await h.post("/v1/completions", json={"model": CHAT, "prompt": "x", "min_tokens": 1,
                                                             "structured_outputs": {"choice": ["a"]}}))
            return out
    *ok, refused = run(go())
    assert all(r.status_code == 200 for r in ok), [r.text for r in ok]
    specs = [r.response_format for r in fake.requests]
    assert all(s.pop("param") == "structured_outputs" for s in specs)
    assert specs == [{"type": "choice", "choice": ["yes", "no"]}, {"type": "regex", "regex": "[0-9]+"},
                     {"type": "json_schema", "schema": schema}, {"type": "json_schema", "schema": schema},
                     {"type": "grammar", "grammar": 'root ::= "a"'}, {"type": "json_object"},
                     {"type": "structural_tag", "format": tag},
                     {"type": "structural_tag",
                      "format": {"type": "triggered_tags", "triggers": ["<a"], "tags": [tag]}},
                     {"type": "json_schema", "schema": schema, "any_whitespace": True, "strict": False},
                     {"type": "json_object"},
                     {"type": "choice", "choice": ["a"]}]
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "min_tokens"


def test_max_tokens_0_is_a_completions_prompt_score_and_a_400_for_chat():
    """The spec's minimum is 0 for /v1/completions (with echo: the prompt and its logprobs) and 1 for chat."""
    fake = FakeChatClient()
    async def go():
        async with raw_client(make_app(fake)) as h:
            scored = await h.post("/v1/completions", json={"model": CHAT, "prompt": "x", "max_tokens": 0,
                                                           "echo": True, "logprobs": 0})
            chat = await h.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 0,
                                                              "messages": [{"role": "user", "content": "x"}]})
            return scored, chat
    scored, chat = run(go())
    assert scored.status_code == 200 and fake.requests[0].sampling.max_tokens == 0
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "integer_below_min_value"


def test_image_response_and_size_errors_write_sizes_w_star_h():
    async def go():
        async with raw_client(make_app()) as h:
            ok = await h.post("/v1/images/generations", json={"model": IMG, "prompt": "p", "size": "32x32",
                                                              "response_format": "b64_json"})
            bad = await h.post("/v1/images/generations", json={"model": IMG, "prompt": "p", "size": "16*16"})
            return ok, bad
    ok, bad = run(go())
    assert ok.json()["size"] == "32*32"
    assert bad.json()["error"]["message"].startswith("Invalid size '16*16'")


def test_version_and_utility_endpoints_sit_behind_the_same_auth(monkeypatch):
    from ingress.routes.version import server_version
    from deployments.config import AuthConfig
    monkeypatch.setenv("TEST_MODELHUB_KEYS", "k1")
    app = make_app(auth=AuthConfig(api_keys_env="TEST_MODELHUB_KEYS"))
    async def go():
        async with raw_client(app) as h:
            denied = [await h.post(p, json={}) for p in ("/tokenize", "/detokenize", "/v1/rerank", "/v1/score")]
            denied.append(await h.get("/version"))
            ok = await h.get("/version", headers={"Authorization": "Bearer k1"})
            return denied, ok
    denied, ok = run(go())
    assert [r.status_code for r in denied] == [401] * 5
    assert ok.status_code == 200 and ok.json() == {"version": server_version()}


def test_openai_fields_that_cannot_change_the_output_are_accepted_as_no_ops():
    no_ops = {"store": False, "metadata": {"team": "search"}, "safety_identifier": "u-1", "prompt_cache_key": "k",
              "prompt_cache_retention": "24h", "service_tier": "auto", "modalities": ["text"]}
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "ab"}],
                                                              **no_ops})
    r = run(go())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "ba"


@pytest.mark.parametrize("field,value", [
    ("store", True), ("service_tier", "priority"), ("modalities", ["text", "audio"]), ("audio", {"voice": "x"}),
    ("reasoning_effort", "low"), ("verbosity", "low"), ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("metadata", {f"k{i}": "v" for i in range(17)}),
])
def test_openai_fields_that_would_change_the_output_are_400_naming_them(field, value):
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "x"}],
                                                              field: value})
    r = run(go())
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("extra,param", [
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content"),
])
def test_openai_features_the_compat_table_lists_as_refused_are_400(extra, param):
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/chat/completions", json={
                "model": CHAT, "messages": [{"role": "user", "content": "x"}], **extra})
    r = run(go())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_return_token_ids_puts_vllms_fields_where_vllm_does_and_nowhere_without_it():
    """Chat: `prompt_token_ids` on the response (a stream's first event only) and `token_ids` on each
    choice (a stream event's new tokens); completions: both on each choice. Without the flag the wire
    format is OpenAI's, with neither key."""
    from tests.unit.fakes import PROMPT_IDS
    ask = {"messages": [{"role": "user", "content": "abc"}], "n": 2}

    async def go():
        c = client_for(make_app())
        on = {"return_token_ids": True}
        chat = await c.chat.completions.create(model=CHAT, extra_body=on, **ask)
        plain = await c.chat.completions.create(model=CHAT, **ask)
        events = [e async for e in await c.chat.completions.create(model=CHAT, stream=True, extra_body=on, **ask)]
        legacy = await c.completions.create(model=CHAT, prompt="abc", extra_body=on)
        legacy_events = [e async for e in await c.completions.create(model=CHAT, prompt="abc", stream=True,
                                                                      extra_body=on)]
        return chat, plain, events, legacy, legacy_events
    chat, plain, events, legacy, legacy_events = run(go())
    assert chat.model_extra["prompt_token_ids"] == PROMPT_IDS
    assert [ch.model_extra["token_ids"] for ch in chat.choices] == [list(b"cba")] * 2
    assert "prompt_token_ids" not in plain.model_dump() and "token_ids" not in plain.choices[0].model_dump()
    assert [e.model_extra.get("prompt_token_ids") for e in events[:2]] == [PROMPT_IDS, None]
    assert all("prompt_token_ids" not in e.model_extra for e in events[1:])
    for i in range(2):
        ids = [t for e in events for ch in e.choices if ch.index == i for t in ch.model_extra.get("token_ids", [])]
        assert ids == list(b"cba")
    assert legacy.choices[0].model_extra == {"prompt_token_ids": PROMPT_IDS, "token_ids": list(b"cba")}
    assert [e.choices[0].model_extra.get("prompt_token_ids") for e in legacy_events] == [PROMPT_IDS, None, None]
    assert [t for e in legacy_events for t in e.choices[0].model_extra["token_ids"]] == list(b"cba")


def test_return_token_ids_must_be_a_boolean():
    async def go():
        async with raw_client(make_app()) as h:
            return await h.post("/v1/chat/completions", json={"model": CHAT, "return_token_ids": "yes",
                                                              "messages": [{"role": "user", "content": "x"}]})
    r = run(go())
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_token_ids"


def test_prompt_logprobs_are_vllms_shape_on_chat_and_completions_and_400_where_vllm_refuses():
    ask = {"messages": [{"role": "user", "content": "abc"}], "n": 2}
    wire = [None, {"2": {"logprob": -2.5, "rank": 4, "decoded_token": "b"},
                   "0": {"logprob": -0.25, "rank": 1, "decoded_token": "x"}},
            {"3": {"logprob": -0.5, "rank": 1, "decoded_token": "c"}}]

    async def go():
        c = client_for(make_app())
        chat = await c.chat.completions.create(model=CHAT, extra_body={"prompt_logprobs": 1}, **ask)
        legacy = await c.completions.create(model=CHAT, prompt="abc", n=2, extra_body={"prompt_logprobs": 1})
        plain = await c.completions.create(model=CHAT, prompt="abc")
        async with raw_client(make_app()) as h:
            refused = [await h.post("/v1/chat/completions", json={"model": CHAT, **ask, **extra})
                       for extra in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 21},
                                     {"prompt_logprobs": -1})]
            refused.append(await h.post("/v1/completions", json={"model": CHAT, "prompt": "x", "stream": True,
                                                                 "prompt_logprobs": 0}))
        return chat, legacy, plain, refused
    chat, legacy, plain, refused = run(go())
    assert chat.model_extra["prompt_logprobs"] == wire and "prompt_logprobs" not in chat.choices[0].model_extra
    assert [ch.model_extra["prompt_logprobs"] for ch in legacy.choices] == [wire, wire]
    assert "prompt_logprobs" not in plain.choices[0].model_extra
    assert [(r.status_code, r.json()["error"]["param"]) for r in refused] == [(400, "prompt_logprobs")] * 4


def _post_each(fake, *groups):
    """POSTs each group of (path, body) requests in turn to one app over `fake`; the responses, by group."""
    async def go():
        async with raw_client(make_app(fake)) as h:
            return [[await h.post(path, json=body) for path, body in group] for group in groups]
    return run(go())


def _chat(**body):
    return "/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": "x"}], **body}


def _completion(**body):
    return "/v1/completions", {"model": CHAT, "prompt": "x", **body}


def test_return_tokens_as_token_ids_reaches_the_engine_and_needs_logprobs():
    fake = FakeChatClient()
    ok, refused = _post_each(fake, [_chat(logprobs=True, return_tokens_as_token_ids=True),
                                    _completion(logprobs=0, return_tokens_as_token_ids=True)],
                             [_chat(return_tokens_as_token_ids=True), _completion(return_tokens_as_token_ids=True)])
    assert [r.status_code for r in ok] == [200, 200]
    assert [r.sampling.return_tokens_as_token_ids for r in fake.requests] == [True, True]
    assert [(r.status_code, r.json()["error"]["param"]) for r in refused] == [(400, "return_tokens_as_token_ids")] * 2


def test_bad_words_reach_the_engine_and_bad_entries_are_400():
    fake = FakeChatClient()
    (ok,), refused = _post_each(fake, [_completion(bad_words=["Paris", "Lyon"])],
                                [_chat(bad_words=w) for w in ([" "], [""], ["x" * 1025], ["w"] * 65, "Paris", [1])])
    assert ok.status_code == 200 and fake.requests[0].sampling.bad_words == ["Paris", "Lyon"]
    assert [(r.status_code, r.json()["error"]["param"]) for r in refused] == [(400, "bad_words")] * 5 + [
        (400, "bad_words[0]")]


def test_continuous_usage_stats_put_the_usage_so_far_on_every_event_and_need_include_usage():
    """vLLM's stream_options.continuous_usage_stats: each streamed event carries the usage so far, then
    the usual usage-only event; without include_usage it could not take effect: 400."""
    on = {"include_usage": True, "continuous_usage_stats": True}

    async def go():
        c = client_for(make_app())
        chat = [e async for e in await c.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "abc"}], stream=True, stream_options=on)]
        legacy = [e async for e in await c.completions.create(model=CHAT, prompt="abc", stream=True, stream_options=on)]
        plain = [e async for e in await c.completions.create(model=CHAT, prompt="abc", stream=True,
                                                             stream_options={"include_usage": True})]
        async with raw_client(make_app()) as h:
            refused = await h.post("/v1/completions", json={"model": CHAT, "prompt": "x", "stream": True,
                                                            "stream_options": {"continuous_usage_stats": True}})
        return chat, legacy, plain, refused
    chat, legacy, plain, refused = run(go())
    for events in (chat, legacy):
        counts = [e.usage.completion_tokens for e in events]
        assert counts[-2:] == [3, 3] and counts == sorted(counts) and counts[0] >= 1   # so far, then the total
        assert all(e.usage.prompt_tokens == 3 for e in events)
    assert [e.usage is None for e in plain] == [True] * 3 + [False]
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_options.continuous_usage_stats"
