"""Property-based fuzzing of every endpoint of the real application (hypothesis): valid requests and
mutated ones (wrong types, empty values, huge numbers, non-ASCII digits, deep nesting, unknown and
missing fields, raw bytes). Every answer must be below 500; every 4xx must carry OpenAI error JSON;
every 200 must parse as the openai package's own types; and the server must be healthy afterwards.
Each test counts its requests, and the last one checks that at least 2,000 were sent."""
from __future__ import annotations

import base64
import json
import sys
import urllib.parse

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import CreateEmbeddingResponse, ImagesResponse, Model
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion

from tests.integration.conftest import CHAT, EMB, IMG

SENT: dict[str, int] = {}
sys.set_int_max_str_digits(0)   # so the test can send a 5,000-digit number (the server's json refuses it: a 400)
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def http(hub):
    with httpx.Client(base_url=hub.direct_url.removesuffix("/v1"), timeout=120) as h:
        yield h


# ----------------------------------------------------------------------------- values

HUGE = [2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, 1e308, -1e308, 1e-320, 10**5000]
ODD_TEXT = ["", " ", "\x00", "١٢٣", "²", "１２８", "½", "9" * 5000, "🤖" * 3, "\ud800", "null", "-0", "1e5", "64x64x64"]


def nested(depth: int):
    return json.loads("[" * depth + "1" + "]" * depth) if depth < 900 else "[" * depth   # deep, or a bomb string


nasty = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5), st.sampled_from(HUGE), st.floats(allow_nan=False),
    st.sampled_from(ODD_TEXT), st.text(max_size=20), st.lists(st.integers(-2, 3), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 3), max_size=3),
    st.sampled_from([nested(3), nested(40), nested(80), {"a": nested(70)}, [], {}, [[]], [""], [{}]]),
)
names = st.sampled_from(["model", "stream", "n", "max_tokens", "temperature", "top_p", "seed", "stop", "logit_bias",
                         "logprobs", "top_logprobs", "messages", "prompt", "input", "size", "tools", "tool_choice",
                         "response_format", "stream_options", "echo", "dimensions", "encoding_format", "user",
                         "presence_penalty", "frequency_penalty", "max_completion_tokens", "num_inference_steps",
                         "guidance_scale", "negative_prompt", "response_format", "parallel_tool_calls", "unknown_x",
                         "query", "documents", "top_n", "text_1", "text_2", "tokens"])


def mutated(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid body, then maybe some fields set to nasty values, deleted, or added."""
    @st.composite
    def build(draw):
        body = dict(draw(valid))
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.one_of(names, st.sampled_from(sorted(body) or ["model"])))
            if draw(st.integers(0, 4)) == 0:
                body.pop(key, None)
            else:
                body[key] = draw(nasty)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 2   # no cap means thousands of tokens: slow, and nothing more to learn
        return body
    return build()


small_tokens = st.integers(1, 4)
vllm_sampling = {"top_k": st.integers(-3, 60), "min_p": st.floats(-0.5, 1.5), "repetition_penalty": st.floats(-1, 3),
                 "min_tokens": st.integers(0, 6), "ignore_eos": st.booleans(),
                 "stop_token_ids": st.lists(st.integers(-5, 60000), max_size=3),
                 "allowed_token_ids": st.lists(st.integers(-5, 60000), max_size=3)}   # vLLM's extensions
stop = st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(min_size=1, max_size=4), max_size=4))
bias = st.dictionaries(st.integers(0, 49151).map(str), st.integers(-100, 100), max_size=3)
schema = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "object", "properties": {"x": {"enum": ["p", "q"]}, "y": {"type": "array", "items": {"type": "string"}}}},
    {"type": "string"}, {"type": "nonsense"}, {"$ref": "#/nope"}, {"type": "object", "properties": nested(5)},
])
structured_outputs = st.one_of(   # vLLM's: one constraint each, valid or not, and some with none or two
    st.fixed_dictionaries({"choice": st.lists(st.text(max_size=6), max_size=3)}),
    st.fixed_dictionaries({"regex": st.one_of(st.sampled_from(["[0-9]{1,3}", "(yes|no)", "(((", "[z-a]", ".*"]),
                                               st.text(max_size=8))}),
    st.fixed_dictionaries({"json": st.one_of(schema, st.text(max_size=10))}),
    st.fixed_dictionaries({"grammar": st.sampled_from(['root ::= "a" [0-9]', 'start: "x" | "y"', "root ::= (", "",
                                                       "root ::= undefined"])}),
    st.fixed_dictionaries({"json_object": st.booleans()}),
    st.just({}), st.just({"regex": "a", "choice": ["a"]}), st.just({"regex": "a", "whitespace_pattern": " "}))
chat_template = {"add_generation_prompt": st.booleans(), "continue_final_message": st.booleans(),
                 "chat_template_kwargs": st.one_of(st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
                                                   st.just({"enable_thinking": False}), st.just({"messages": []}))}
vllm_text = {"skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
             "return_token_ids": st.one_of(st.booleans(), st.just("yes")), "prompt_logprobs": st.integers(-2, 25),
             "return_tokens_as_token_ids": st.booleans(), "bad_words": st.lists(st.text(max_size=6), max_size=3),
             "stream_options": st.fixed_dictionaries({"include_usage": st.booleans(),
                                                     "continuous_usage_stats": st.booleans()}),
             "truncate_prompt_tokens": st.integers(-3, 10000), "truncation_side": st.sampled_from(["left", "right", "up"]),
             "structured_outputs": structured_outputs}
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "f", "bad name", "x" * 70]),
     "parameters": st.one_of(schema, st.just({"type": "object", "properties": {"city": {"type": "string"}}}))})})
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": st.text(max_size=30)}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(max_size=10)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": st.text(max_size=10), "tool_call_id": st.just("c1")}),
)

chat_body = st.fixed_dictionaries(
    {"model": st.just(CHAT), "messages": st.lists(message, min_size=1, max_size=3), "max_tokens": small_tokens},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "n": st.integers(1, 3), "stop": stop,
              "seed": st.integers(0, 2**32), "logit_bias": bias, "presence_penalty": st.floats(-2, 2),
              "frequency_penalty": st.floats(-2, 2), "stream": st.booleans(), "logprobs": st.booleans(),
              **vllm_sampling, **vllm_text, **chat_template,
              "tools": st.lists(tool, min_size=1, max_size=2),
              "tool_choice": st.sampled_from(["auto", "none", "required"]),
              "response_format": st.one_of(st.just({"type": "json_object"}), st.just({"type": "text"}),
                                           schema.map(lambda s: {"type": "json_schema",
                                                                 "json_schema": {"name": "s", "schema": s}}))})
completion_body = st.fixed_dictionaries(
    {"model": st.just(CHAT), "prompt": st.one_of(st.text(min_size=1, max_size=30),
                                                 st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3),
                                                 st.lists(st.integers(0, 49151), min_size=1, max_size=8)),
     "max_tokens": st.integers(0, 4)},   # 0: the prompt alone (with echo, its logprobs)
    optional={"temperature": st.floats(0, 2), "n": st.integers(1, 2), "echo": st.booleans(), "stop": stop,
              "logprobs": st.integers(0, 5), "stream": st.booleans(), "seed": st.integers(0, 100), "logit_bias": bias,
              **vllm_sampling, **vllm_text})
embedding_body = st.fixed_dictionaries(
    {"model": st.just(EMB), "input": st.one_of(st.text(min_size=1, max_size=50),
                                               st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4),
                                               st.lists(st.integers(0, 30000), min_size=1, max_size=8))},
    optional={"encoding_format": st.sampled_from(["float", "base64"]), "dimensions": st.integers(1, 400),
              "user": st.text(max_size=10), "truncate_prompt_tokens": st.integers(-3, 300)})
image_body = st.fixed_dictionaries(
    {"model": st.just(IMG), "prompt": st.text(min_size=1, max_size=30)},
    optional={"n": st.integers(1, 2), "size": st.sampled_from(["64x64", "64*64", "128x128", "auto", "65x64"]),
              "response_format": st.sampled_from(["url", "b64_json"]), "seed": st.integers(0, 100),
              "num_inference_steps": st.integers(1, 3), "guidance_scale": st.floats(0, 10),
              "negative_prompt": st.text(max_size=10)})

RERANK = "tiny-random-cross-encoder"
texts = st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4)
utility_body = st.one_of(   # (path, body): vLLM's utility routes
    st.tuples(st.just("/tokenize"), st.fixed_dictionaries(
        {"model": st.just(CHAT)}, optional={"prompt": st.text(max_size=30), "messages": st.lists(message, max_size=2),
                                            "add_special_tokens": st.booleans(), "return_token_strs": st.booleans(),
                                            **chat_template})),
    st.tuples(st.just("/detokenize"), st.fixed_dictionaries(
        {"model": st.just(CHAT), "tokens": st.lists(st.integers(0, 49151), max_size=8)})),
    st.tuples(st.sampled_from(["/v1/rerank", "/rerank", "/v2/rerank"]), st.fixed_dictionaries(
        {"model": st.sampled_from([RERANK, EMB]), "query": st.text(max_size=20), "documents": texts},
        optional={"top_n": st.integers(-1, 5), "return_documents": st.booleans()})),
    st.tuples(st.sampled_from(["/v1/score", "/score"]), st.fixed_dictionaries(
        {"text_1": st.one_of(st.text(max_size=20), texts), "text_2": st.one_of(st.text(max_size=20), texts)},
        optional={"model": st.sampled_from([RERANK, EMB])})),
)

OK_TYPES = {"/v1/chat/completions": ChatCompletion, "/v1/completions": Completion,
            "/v1/embeddings": CreateEmbeddingResponse, "/v1/images/generations": ImagesResponse}


# ----------------------------------------------------------------------------- checks

def check(r: httpx.Response, path: str) -> None:
    SENT[path] = SENT.get(path, 0) + 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert r.status_code != 422, r.text[:300]
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), r.text[:300]
        if r.status_code in (429, 503):
            assert int(r.headers["retry-after"]) >= 1
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and (events[-1] == "[DONE]" or "error" in json.loads(events[-1])), r.text[-300:]
        for e in events[:-1]:
            json.loads(e)
        return
    if path in OK_TYPES:
        OK_TYPES[path].model_validate(_echo_first_logprob_filled(r.json()))


def _echo_first_logprob_filled(body: dict) -> dict:
    """With echo + logprobs the first prompt token's logprob is null, as the real API sends it
    (openai-spec FACTS.md); the openai package's Completion type does not allow that one null.
    Base64 embeddings are decoded, as the SDK does before it builds its type."""
    for item in body.get("data", ()) if body.get("object") == "list" else ():
        if isinstance(item.get("embedding"), str):   # encoding_format base64: the SDK decodes it first
            item["embedding"] = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4").tolist()
    for choice in body.get("choices", ()):
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        if isinstance(lp, dict) and lp.get("token_logprobs") and lp["token_logprobs"][0] is None:
            lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    return body


def post(http, path, body) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    check(r, path)


@settings(FUZZ, max_examples=700)
@given(body=st.one_of(mutated(chat_body), chat_body))
def test_fuzz_chat(http, body):
    post(http, "/v1/chat/completions", body)


@settings(FUZZ, max_examples=450)
@given(body=st.one_of(mutated(completion_body), completion_body))
def test_fuzz_completions(http, body):
    post(http, "/v1/completions", body)


@settings(FUZZ, max_examples=400)
@given(body=st.one_of(mutated(embedding_body), embedding_body))
def test_fuzz_embeddings(http, body):
    post(http, "/v1/embeddings", body)


@settings(FUZZ, max_examples=200)
@given(body=st.one_of(mutated(image_body), image_body))
def test_fuzz_images(http, body):
    post(http, "/v1/images/generations", body)


@settings(FUZZ, max_examples=150)
@given(name=st.one_of(st.text(max_size=40), st.sampled_from([CHAT, EMB, IMG, "a/../b", "%00", "x" * 3000])),
       files=st.booleans())
def test_fuzz_models_and_image_files(http, name, files):
    quoted = urllib.parse.quote(name, safe="/")
    path = f"/v1/images/files/{quoted}" if files else f"/v1/models/{quoted}"
    r = http.get(path)
    check(r, "GET " + path.split("/")[2])
    if not files and r.status_code == 200:
        Model.model_validate(r.json())


@settings(FUZZ, max_examples=120)
@given(path=st.sampled_from(list(OK_TYPES)), raw=st.one_of(
    st.binary(max_size=64), st.sampled_from([b"", b"{", b"[]", b"null", b'"x"', b"{}", b'{"model": NaN}',
                                             b"[" * 5000, b'{"model": "' + b"\xff" * 10 + b'"}', b"\xef\xbb\xbf{}"])))
def test_fuzz_raw_bodies(http, path, raw):
    post(http, path, raw)


@settings(FUZZ, max_examples=200)
@given(call=utility_body, mutate=st.booleans(), data=st.data())
def test_fuzz_utility_routes(http, call, mutate, data):
    path, body = call
    if mutate:
        body = data.draw(mutated(st.just(body)))
        if "max_tokens" not in call[1]:
            body.pop("max_tokens", None)   # mutated() adds it for the generation routes
    post(http, path, body)
    if path == "/v1/rerank":
        check(http.get("/version"), "GET version")


def test_server_is_healthy_after_the_fuzzing_and_enough_was_sent(http, measured):
    total = sum(SENT.values())
    assert total >= 2000 or not SENT, SENT     # the whole module ran: at least 2,000 requests
    assert http.get("/ready").status_code == 200
    r = http.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 8, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    measured(f"fuzz: {total} requests, by endpoint: {SENT}")
