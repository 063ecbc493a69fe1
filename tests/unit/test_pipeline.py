"""The request pipeline in-process: caps checked before model work, odd inputs as 400s, timeouts."""
from __future__ import annotations

import asyncio
import json

import pytest

from deployments.config import RequestLimits
from deployments.types import GenerateChunk, ModelCard
from tests.unit.fakes import FakeChatClient
from tests.unit.test_api import CHAT, EMB, IMG, make_app, raw_client, run

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def post_all(app, requests):
    async def go():
        async with raw_client(app) as h:
            return [await h.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                                 headers={"content-type": "application/json"}) for path, body in requests]
    return run(go())


CAPS = [  # (limit settings, path, body, param named in the 400)
    ({"max_messages": 3}, "/v1/chat/completions", {"model": CHAT, "messages": MSG * 4}, "messages"),
    ({"max_prompt_chars": 10}, "/v1/chat/completions",
     {"model": CHAT, "messages": [{"role": "user", "content": "x" * 11}]}, "messages"),
    ({"max_tools": 1}, "/v1/chat/completions", {"model": CHAT, "messages": MSG, "tools": [TOOL, TOOL]}, "tools"),
    ({"max_stop_chars": 5}, "/v1/chat/completions", {"model": CHAT, "messages": MSG, "stop": ["123456"]}, "stop"),
    ({"max_logit_bias": 2}, "/v1/completions", {"model": CHAT, "prompt": "a", "logit_bias": {"1": 1, "2": 1, "3": 1}},
     "logit_bias"),
    ({"max_prompt_chars": 10}, "/v1/completions", {"model": CHAT, "prompt": ["x" * 6, "y" * 6]}, "prompt"),
    ({"max_prompt_chars": 3}, "/v1/completions", {"model": CHAT, "prompt": [1, 2, 3, 4]}, "prompt"),
    ({"max_embedding_inputs": 2}, "/v1/embeddings", {"model": EMB, "input": ["a", "b", "c"]}, "input"),
    ({"max_embedding_input_chars": 4}, "/v1/embeddings", {"model": EMB, "input": ["a", "hello"]}, "input"),
    ({"max_schema_bytes": 256}, "/v1/chat/completions", {"model": CHAT, "messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "description": "d" * 300}}}},
     "response_format.json_schema"),
    ({"max_prompt_chars": 3}, "/v1/images/generations", {"model": IMG, "prompt": "p", "negative_prompt": "long"},
     "negative_prompt"),
]


@pytest.mark.parametrize("limits,path,body,param", CAPS, ids=[c[3] + "-" + c[1].rsplit("/", 1)[1] for c in CAPS])
def test_each_cap_is_a_400_naming_it_before_the_model_is_called(limits, path, body, param):
    chat = FakeChatClient()
    r, = post_all(make_app(chat, limits=RequestLimits(**limits)), [(path, body)])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "limit_exceeded" and f"limits.{next(iter(limits))}" in err["message"]
    assert chat.requests == []


ODD = [  # inputs that once got a 500
    ("/v1/chat/completions", {"model": CHAT, "messages": MSG, "logit_bias": {"²": 1}}),
    ("/v1/chat/completions", {"model": CHAT, "messages": MSG, "logit_bias": {"١٢": 1}}),
    ("/v1/chat/completions", {"model": CHAT, "messages": MSG, "logit_bias": {"9" * 5000: 1}}),
    ("/v1/images/generations", {"model": IMG, "prompt": "p", "size": "²x²"}),
    ("/v1/images/generations", {"model": IMG, "prompt": "p", "size": "６４x６４"}),
    ("/v1/images/generations", {"model": IMG, "prompt": "p", "size": "9" * 5000 + "x64"}),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
    ("/v1/chat/completions", json.dumps({"model": CHAT, "messages": MSG, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": json.loads("{\"a\":" * 200 + "1" + "}" * 200)}}]})
     .encode()),
    ("/v1/chat/completions", json.dumps({"model": CHAT, "messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": json.loads('{"a":' * 40 + "1" + "}" * 40)}}})
     .encode()),
    ("/v1/chat/completions", json.dumps({"model": CHAT, "messages": json.loads("[" * 900 + "]" * 900)}).encode()),
    ("/v1/chat/completions", b'{"model": "m", "messages": NaN}'),
    ("/v1/embeddings", b"\xff\xfe"),
]


@pytest.mark.parametrize("path,body", ODD)
def test_odd_inputs_are_400s_with_openai_error_json(path, body):
    r, = post_all(make_app(), [(path, body)])
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


class SlowChat(FakeChatClient):
    """Answers after `delay` s, or streams one chunk and then stalls."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.cancelled = 0

    async def generate(self, req):
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().generate(req)

    async def generate_stream(self, req):
        yield GenerateChunk([])
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.cancelled += 1

    async def card(self):
        return ModelCard(id=CHAT, kind="chat", created=1)


def test_a_request_past_the_time_limit_is_504_and_its_work_is_cancelled():
    chat = SlowChat(delay=30)
    r, = post_all(make_app(chat, limits=RequestLimits(request_timeout_s=0.2)),
                  [("/v1/chat/completions", {"model": CHAT, "messages": MSG})])
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert chat.cancelled == 1


def test_a_stalled_stream_ends_with_an_sse_error_event_and_its_work_is_cancelled():
    chat = SlowChat(delay=30)
    r, = post_all(make_app(chat, limits=RequestLimits(stream_idle_timeout_s=0.2)),
                  [("/v1/chat/completions", {"model": CHAT, "messages": MSG, "stream": True})])
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "request_timeout" and "[DONE]" not in r.text
    assert chat.cancelled == 1


class ActorDiedError(Exception):
    """Stands in for ray.exceptions.ActorDiedError (matched by class name)."""


class DiesMidStream(FakeChatClient):
    async def generate_stream(self, req):
        yield GenerateChunk([])
        raise ActorDiedError("the replica process was killed")


def test_a_replica_lost_under_a_request_is_503_with_retry_after_or_a_final_sse_error():
    r1, = post_all(make_app(FakeChatClient(fail_with=ActorDiedError("killed"))),
                   [("/v1/chat/completions", {"model": CHAT, "messages": MSG})])
    assert r1.status_code == 503 and int(r1.headers["retry-after"]) >= 1
    assert r1.json()["error"]["code"] == "engine_unavailable" and "killed" not in r1.text
    r2, = post_all(make_app(DiesMidStream()), [("/v1/chat/completions", {"model": CHAT, "messages": MSG,
                                                                          "stream": True})])
    events = [json.loads(line[6:]) for line in r2.text.splitlines() if line.startswith("data: {")]
    assert r2.status_code == 200 and events[-1]["error"]["code"] == "engine_unavailable"


def test_handle_client_turns_serves_back_pressure_into_a_typed_503_for_calls_and_streams():
    """Serve installs its own handler for BackPressureError on the app (plain text, no JSON, no
    Retry-After), so the handle client must convert it before it reaches FastAPI. Ray's `cancel()`
    re-raises what the replica assignment raised, as this fake does: the stream's cleanup must not let
    that replace the typed error."""
    from ingress.backends import HandleClient

    class BackPressureError(Exception):
        pass

    class Response:
        def __await__(self):
            raise BackPressureError("dropped")
            yield

        def __aiter__(self):
            return self

        async def __anext__(self):
            raise BackPressureError("dropped")

        def cancel(self):
            raise BackPressureError("dropped")

    class Method:
        def remote(self, *a):
            return Response()

    class Handle:
        generate = generate_stream = card = Method()

        def options(self, **kw):
            return self
    from starlette.responses import PlainTextResponse
    app = make_app(HandleClient(Handle()))
    # what Serve's replica installs (ray/serve/_private/replica.py), which outranks the app's own handlers
    app.add_exception_handler(BackPressureError, lambda request, exc: PlainTextResponse("dropped", 503))
    body = {"model": CHAT, "messages": MSG}
    plain, streamed = post_all(app, [("/v1/chat/completions", body),
                                     ("/v1/chat/completions", {**body, "stream": True})])
    for r in (plain, streamed):
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (r.status_code, r.text)
        assert r.json()["error"]["type"] and "dropped" not in r.text
