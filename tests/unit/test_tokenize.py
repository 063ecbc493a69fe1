"""/tokenize and /detokenize: vLLM's shapes in-process, and LLMServer's token ids equal to what
generation feeds the engine."""
from __future__ import annotations

import asyncio

import pytest

from deployments.errors import InvalidRequestError
from deployments.types import GenerateRequest, SamplingParams, TokenizeRequest
from tests.unit.fakes import FakeChatClient
from tests.unit.llm_helpers import make_server
from tests.unit.test_api import CHAT, EMB, make_app, raw_client, run


def post(app, path, body):
    async def go():
        async with raw_client(app) as h:
            return await h.post(path, json=body)
    return run(go())


def test_tokenize_prompt_and_chat_in_vllms_shape():
    fake = FakeChatClient()
    app = make_app(fake)
    plain = post(app, "/tokenize", {"model": CHAT, "prompt": "abc", "return_token_strs": True}).json()
    assert plain == {"count": 3, "max_model_len": 128, "tokens": [97, 98, 99], "token_strs": ["a", "b", "c"]}
    chat = post(app, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})   # model omitted: the chat model
    assert chat.status_code == 200 and chat.json()["count"] == 2 and chat.json()["token_strs"] is None
    assert fake.requests[0].add_special_tokens is True and fake.requests[1].add_special_tokens is False
    back = post(app, "/detokenize", {"model": CHAT, "tokens": [104, 105]})
    assert back.json() == {"prompt": "hi"}


@pytest.mark.parametrize("body,param", [
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False},
     "add_generation_prompt"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
     "continue_final_message"),
    ({"model": CHAT, "prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
    ({"model": CHAT}, "prompt"),
    ({"model": EMB, "prompt": "x"}, "model"),
])
def test_bad_tokenize_requests_are_400_naming_the_field(body, param):
    r = post(make_app(), "/tokenize", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_detokenize_needs_integer_tokens():
    r = post(make_app(), "/detokenize", {"model": CHAT, "tokens": ["a"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[0]"


def test_server_tokenizes_chat_as_generation_does():
    server = make_server()
    messages = [{"role": "user", "content": "hello"}]

    async def go():
        result = await server.generate(GenerateRequest("g", SamplingParams(max_tokens=1), messages=messages))
        server.tokenizer.convert_ids_to_tokens = lambda ids: [chr(i) for i in ids]   # HF tokenizers have it
        tokens = await server.tokenize(TokenizeRequest(messages=messages, add_special_tokens=False,
                                                       return_token_strs=True))
        text = await server.detokenize(tokens.tokens)
        return tokens, result, text
    tokens, result, text = asyncio.run(go())
    assert len(tokens.tokens) == result.usage.prompt_tokens and tokens.max_model_len == 64
    assert "".join(tokens.token_strs) == text and text.startswith("<user>hello")
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(server.detokenize([1, 99999]))
    assert info.value.param == "tokens"
