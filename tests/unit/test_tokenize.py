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


DEEP: list = []
for _ in range(40):
    DEEP = [DEEP]


@pytest.mark.parametrize("body,param", [
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
     "continue_final_message"),      # and add_generation_prompt (default true): both cannot be
    ({"model": CHAT, "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"a": DEEP}},
     "chat_template_kwargs"),        # nested deeper than free-form JSON may be
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


# A template with a generation prompt to leave out, and a variable of its own (as Qwen3's enable_thinking).
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</m>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% if not thinking | default(true) %}<no-think>{% endif %}{% endif %}")


@pytest.mark.parametrize("options,rendered", [
    (None, "<user>hello</m><assistant>"),
    ({"kwargs": {"thinking": False}}, "<user>hello</m><assistant><no-think>"),
    ({"add_generation_prompt": False}, "<user>hello</m>"),
    ({"add_generation_prompt": False, "continue_final_message": True}, "<user>hello</m><assistant>Sure,"),
])
def test_chat_template_options_render_generation_and_tokenize_alike(options, rendered):
    """vLLM's add_generation_prompt, continue_final_message (an assistant prefill the reply continues)
    and chat_template_kwargs: generation and /tokenize render the same prompt."""
    from deployments.types import ChatTemplateOptions
    server = make_server()
    server.tokenizer.chat_template = TEMPLATE
    messages = [{"role": "user", "content": "hello"}]
    if options and options.get("continue_final_message"):
        messages.append({"role": "assistant", "content": "Sure,"})
    template = ChatTemplateOptions(**options) if options else None

    async def go():
        result = await server.generate(GenerateRequest("g", SamplingParams(max_tokens=1), messages=messages,
                                                       template=template))
        tokens = await server.tokenize(TokenizeRequest(messages=messages, add_special_tokens=False, template=template))
        return result, tokens
    result, tokens = asyncio.run(go())
    assert bytes(tokens.tokens).decode() == rendered and result.usage.prompt_tokens == len(tokens.tokens)


@pytest.mark.parametrize("kwargs,why", [
    ({"enable_thinking": False}, "does not use 'enable_thinking'"),
    ({"messages": []}, "'messages' is set by the server"),
    ({"add_generation_prompt": False}, "'add_generation_prompt' is set by the server"),
    ({"eos_token": "x"}, "'eos_token' is set by the server"),
    ({"raise_exception": 1}, "'raise_exception' is set by the server"),
])
def test_chat_template_kwargs_the_template_does_not_read_or_the_server_sets_are_400(kwargs, why):
    from deployments.types import ChatTemplateOptions
    server = make_server()
    server.tokenizer.chat_template = TEMPLATE
    server.tokenizer.special_tokens_map = {"eos_token": "<eos>"}
    req = GenerateRequest("g", SamplingParams(max_tokens=1), messages=[{"role": "user", "content": "x"}],
                          template=ChatTemplateOptions(kwargs=kwargs))
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(server.generate(req))
    assert err.value.param == "chat_template_kwargs" and why in str(err.value)


def test_chat_template_fields_reach_the_model_server():
    fake = FakeChatClient()
    app = make_app(fake)
    user = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    fields = {"add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": {"t": 1}}
    assert post(app, "/v1/chat/completions", {"model": CHAT, "messages": user, **fields}).status_code == 200
    assert post(app, "/tokenize", {"model": CHAT, "messages": user, **fields}).status_code == 200
    assert post(app, "/v1/chat/completions", {"model": CHAT, "messages": user}).status_code == 200
    first, tokenized, plain = fake.requests
    assert first.template == tokenized.template and first.template.kwargs == {"t": 1}
    assert (first.template.add_generation_prompt, first.template.continue_final_message) == (False, True)
    assert plain.template is None
