"""LLMServer (server.py) on the tiny model: generate and stream, context and length checks, defaults,
tool calls, grammar compiles."""
from __future__ import annotations

import asyncio

import pytest

from deployments.config import ChatModelConfig
from deployments.errors import ContextLengthExceededError, InvalidRequestError, OverloadedError
from deployments.llm.async_engine import AsyncLLMEngine
from deployments.llm.built_engine import BuiltEngine
from deployments.llm.engine import LLMEngine
from deployments.llm.server import LLMServer
from deployments.types import GenerateRequest, SamplingParams
from tests.unit.fakes import ByteTokenizer
from tests.unit.llm_helpers import chat, make_server, server_model

MODEL = server_model()


def test_generate_matches_stream():
    async def go():
        server = make_server()
        whole = await server.generate(chat(rid="a"))
        chunks = [c async for c in server.generate_stream(chat(rid="b"))]
        return whole, chunks
    whole, chunks = asyncio.run(go())
    streamed = "".join(d.text for c in chunks for d in c.choices)
    assert whole.choices[0].text == streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 8


def test_context_length_checks():
    async def go():
        server = make_server(max_model_len=64)
        errors = []
        for req in (chat(content="x" * 40, max_tokens=40), chat(content="x" * 80, max_tokens=None)):
            try:
                await server.generate(req)
            except ContextLengthExceededError as exc:
                errors.append(exc)
        clamped = await server.generate(chat(content="x" * 30, max_tokens=None, temperature=0.0))
        return errors, clamped
    errors, clamped = asyncio.run(go())
    assert len(errors) == 2 and errors[0].code == "context_length_exceeded" and errors[0].param == "messages"
    assert "maximum context length is 64 tokens" in errors[0].message
    prompt_len = clamped.usage.prompt_tokens
    assert clamped.usage.completion_tokens <= 64 - prompt_len


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens():
    """vLLM's truncate_prompt_tokens: the last k tokens of each prompt (-1: the context window); over the
    window: 400."""
    async def go(keep, prompt, max_tokens=2, truncation_side="left", **kw):
        server = make_server(max_model_len=64)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, echo=True, truncate_prompt_tokens=keep,
                                truncation_side=truncation_side)
        return await server.generate(GenerateRequest("s", params, prompts=[prompt], **kw))
    cut = asyncio.run(go(10, list(b"abcdefghijklmnopqrstuvwxyz")))
    assert cut.usage.prompt_tokens == 10 and cut.choices[0].text.startswith("qrstuvwxyz")
    head = asyncio.run(go(10, list(b"abcdefghijklmnopqrstuvwxyz"), truncation_side="right"))
    assert head.usage.prompt_tokens == 10 and head.choices[0].text.startswith("abcdefghij")
    whole_window = asyncio.run(go(-1, [120] * 100, max_tokens=0))
    assert whole_window.usage.prompt_tokens == 64
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(go(65, [120] * 10))
    assert err.value.param == "truncate_prompt_tokens" and "64" in str(err.value)
    with pytest.raises(ContextLengthExceededError):    # truncated to the window, no room is left for a token
        asyncio.run(go(-1, [120] * 100, max_tokens=1))


def test_max_tokens_0_scores_a_prompt_that_fills_the_context_window():
    """Completions' max_tokens 0 + echo asks for no token, so a prompt of the whole window fits; one token more
    does not."""
    async def go(max_tokens):
        server = make_server(max_model_len=64)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, echo=True)
        return await server.generate(GenerateRequest("s", params, prompts=[[120] * 64]))
    scored = asyncio.run(go(0))
    assert scored.usage.prompt_tokens == 64 and scored.usage.completion_tokens == 0
    assert scored.choices[0].text == "x" * 64 and scored.choices[0].finish_reason == "length"
    assert len(scored.choices[0].logprobs) == 64 and scored.choices[0].logprobs[0].logprob is None
    with pytest.raises(ContextLengthExceededError, match="65 tokens"):
        asyncio.run(go(1))


NO_EOS = {256: -100.0}   # ByteTokenizer's EOS: generation runs to its length limit


def test_default_generation_length_is_openais_unless_configured():
    def lengths(server):
        async def go():
            chat_result = await server.generate(chat(content="x" * 20, max_tokens=None, logit_bias=NO_EOS))
            legacy = await server.generate(GenerateRequest("c", SamplingParams(temperature=0.0, logit_bias=NO_EOS),
                                                           prompts=["x" * 20]))
            return chat_result.usage, legacy.usage.completion_tokens
        return asyncio.run(go())
    chat_usage, legacy = lengths(make_server(max_model_len=64))
    assert chat_usage.total_tokens == 64 and legacy == 16      # chat: the whole window; completions: 16
    chat_usage, legacy = lengths(make_server(max_model_len=64, default_max_tokens=5))
    assert chat_usage.completion_tokens == 5 and legacy == 5
    chat_usage, _ = lengths(make_server(max_model_len=64, default_max_tokens=1000))
    assert chat_usage.total_tokens == 64                       # a default is clamped, never a 400


def test_bad_token_ids_and_n_are_400():
    async def go():
        server = make_server()
        out = []
        for req in (GenerateRequest("t", SamplingParams(max_tokens=2), prompts=[[1, 99999]]),
                    GenerateRequest("b", SamplingParams(max_tokens=2, logit_bias={-5: 1.0}), prompts=["x"]),
                    GenerateRequest("s", SamplingParams(max_tokens=2, stop_token_ids=[3, 300]), prompts=["x"]),
                    GenerateRequest("n", SamplingParams(max_tokens=2, n=99), prompts=["x"])):
            try:
                await server.generate(req)
            except InvalidRequestError as exc:
                out.append(exc.param)
        return out
    assert asyncio.run(go()) == ["prompt", "logit_bias", "stop_token_ids", "n"]


def test_omitted_temperature_and_top_p_take_the_configured_defaults():
    seen = []

    def factory(_cfg):
        tok = ByteTokenizer()
        engine = LLMEngine(MODEL, tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=4096)
        real_add = engine.add
        engine.add = lambda r: (seen.append(r.params), real_add(r))
        return BuiltEngine(AsyncLLMEngine(engine, max_in_flight_seqs=8), tok, 64)
    cfg = ChatModelConfig(id="tiny", kind="chat", source="x",
                          engine={"default_temperature": 0.0, "default_top_p": 0.5})
    server = LLMServer(cfg, engine_factory=factory)

    async def go():
        await server.generate(GenerateRequest("d", SamplingParams(max_tokens=2), messages=[{"role": "user", "content": "x"}]))
        await server.generate(GenerateRequest("e", SamplingParams(max_tokens=2, temperature=1.5, top_p=1.0),
                                              messages=[{"role": "user", "content": "x"}]))
    asyncio.run(go())
    assert (seen[0].temperature, seen[0].top_p) == (0.0, 0.5)
    assert (seen[1].temperature, seen[1].top_p) == (1.5, 1.0)


def test_tools_stream_content_at_once_and_the_call_as_it_is_generated():
    from deployments.llm.server import _with_tool_calls
    from deployments.llm.tool_calls import FORMATS
    from deployments.types import ChoiceDelta, GenerateChunk, Usage

    async def engine_stream():
        for text in ["Let me ", "check. <tool_", 'call>{"name": "f", "arguments": {"x"', ': 1}}</tool_call>']:
            yield GenerateChunk([ChoiceDelta(0, text, None)], None)
        yield GenerateChunk([ChoiceDelta(0, "", None, "stop")], Usage(5, 9))

    async def go():
        return [c async for c in _with_tool_calls(engine_stream(), FORMATS["hermes"])]
    chunks = asyncio.run(go())
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[:2] == ["Let me ", "check. "]                  # content went out before the reply ended
    last = chunks[-1].choices[0]
    assert last.finish_reason == "tool_calls" and last.tool_calls[0].name == "f" and last.text == ""
    assert chunks[-1].usage.completion_tokens == 9
    deltas = [(d.id is not None, d.name, d.arguments) for c in chunks for ch in c.choices for d in ch.tool_call_deltas or []]
    assert deltas == [(True, "f", ""), (False, None, '{"x"'), (False, None, ": 1}")]   # before the reply ended
    assert chunks[2].choices[0].tool_call_deltas                                         # with the 3rd engine chunk


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                                     "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 31}, "maxItems": 3}},
    "required": ["city", "unit", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def tool_server(**kw) -> LLMServer:
    from tests.unit.fakes import byte_grammars
    server = make_server(max_model_len=256, **kw)
    server._grammar_cache = byte_grammars()
    # a template that takes `tools` itself keeps the prompt short (no system prompt listing them)
    server.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ tools|length }}<assistant>"
    return server


def _reassembled(chunks) -> dict:
    """What a client accumulates from the streamed deltas: {index: (id, name, arguments)}."""
    calls: dict = {}
    for c in chunks:
        for d in c.choices:
            for t in d.tool_call_deltas or []:
                prev = calls.get(t.index, (None, None, ""))
                calls[t.index] = (t.id or prev[0], t.name or prev[1], prev[2] + t.arguments)
    return calls


@pytest.mark.parametrize("choice", ["get_weather", "required"])
def test_forced_calls_on_a_random_model_parse_and_match_the_schema_and_stream_alike(choice):
    import json

    import jsonschema
    from deployments.types import ToolSpec

    def request(rid, seed):
        req = chat(rid=rid, temperature=1.0, seed=seed, max_tokens=200)
        req.tools = ToolSpec([WEATHER, TIME], choice)
        return req

    async def go():
        server = tool_server()
        out = []
        for seed in range(4):
            whole = await server.generate(request(f"w{seed}", seed))
            chunks = [c async for c in server.generate_stream(request(f"s{seed}", seed))]
            out.append((whole, chunks))
        return out
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": {"type": "object", "properties": {},
                                                                            "additionalProperties": False}}
    finished = 0
    for whole, chunks in asyncio.run(go()):
        c = whole.choices[0]
        assert c.text == "" and c.tool_calls
        complete = c.tool_calls if c.finish_reason == "tool_calls" else c.tool_calls[:-1]
        assert c.finish_reason == "tool_calls" or (choice == "required" and c.finish_reason == "length")
        finished += c.finish_reason == "tool_calls"    # a random model may go on calling until max_tokens
        for call in complete:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            assert choice == "required" or call.name == "get_weather"
        streamed = _reassembled(chunks)
        assert [(n, a) for _, n, a in streamed.values()] == [(t.name, t.arguments) for t in c.tool_calls]
        assert [i for i, _, _ in streamed.values()] == [t.id for t in chunks[-1].choices[-1].tool_calls]
    assert finished >= 2


def test_required_without_parallel_calls_gives_exactly_one_call():
    from deployments.types import ToolSpec

    async def go():
        server = tool_server()
        results = []
        for seed in range(4):
            req = chat(rid=f"r{seed}", temperature=1.0, seed=seed, max_tokens=150)
            req.tools = ToolSpec([TIME], "required", parallel=False)
            results.append(await server.generate(req))
        return results
    for r in asyncio.run(go()):
        assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].tool_calls) == 1


def test_a_forced_call_cut_by_max_tokens_finishes_with_length():
    from deployments.types import ToolSpec
    req = chat(max_tokens=62)     # the call's header is 52 bytes: cut inside its arguments
    req.tools = ToolSpec([WEATHER], "get_weather")
    result = asyncio.run(tool_server().generate(req))
    choice = result.choices[0]
    assert choice.finish_reason == "length" and choice.text == ""      # the cut call is no content...
    assert choice.tool_calls[0].name == "get_weather"                    # ...but the call, as far as it got


def test_more_tools_than_the_cap_is_a_400_naming_tools():
    from deployments.types import ToolSpec
    server = make_server()
    server.cfg.engine.max_tools = 2
    req = chat()
    req.tools = ToolSpec([TIME, TIME, TIME], "auto")
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(server.generate(req))
    assert err.value.param == "tools" and "at most 2" in str(err.value)


def test_schema_compiles_are_bounded_in_time_and_in_threads():
    import threading
    release = threading.Event()

    class SlowGrammars:
        def compile(self, response_format):
            release.wait(30)
            return None

    async def go():
        server = make_server()
        server.cfg.engine.grammar_compile_timeout_s = 0.3
        server._grammar_cache = SlowGrammars()
        rf = {"type": "json_schema", "schema": {"type": "object"}}
        results = await asyncio.gather(*(server.generate(GenerateRequest(
            f"s{i}", SamplingParams(max_tokens=2), messages=[{"role": "user", "content": "x"}], response_format=rf))
            for i in range(3)), return_exceptions=True)
        release.set()
        return results
    results = asyncio.run(go())
    too_slow = [r for r in results if isinstance(r, InvalidRequestError)]
    busy = [r for r in results if isinstance(r, OverloadedError)]
    assert len(too_slow) == 2 and too_slow[0].code == "schema_too_complex"   # two compiling
    assert len(busy) == 1 and busy[0].headers["Retry-After"]                  # one waited for a thread


def test_allowed_token_ids_outside_the_vocabulary_are_a_400():
    req = GenerateRequest("s", SamplingParams(max_tokens=2, allowed_token_ids=[5, 10**6]), prompts=["x"])
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(make_server().generate(req))
    assert err.value.param == "allowed_token_ids"


def test_return_token_ids_whole_and_streamed_are_the_prompt_and_every_sampled_token():
    ask = dict(return_token_ids=True, n=2, seed=3, temperature=1.0, max_tokens=6)

    async def go():
        server = make_server()
        whole = await server.generate(chat(rid="a", **ask))
        chunks = [c async for c in server.generate_stream(chat(rid="b", **ask))]
        plain = await server.generate(chat(rid="c"))
        return whole, chunks, plain
    whole, chunks, plain = asyncio.run(go())
    rendered = list(b"<user>hi<assistant>")
    assert [c.prompt_token_ids for c in whole.choices] == [rendered, rendered]
    assert sum(len(c.token_ids) for c in whole.choices) == whole.usage.completion_tokens
    for c in whole.choices:
        assert ByteTokenizer().decode(c.token_ids) == c.text
        deltas = [d for ch in chunks for d in ch.choices if d.index == c.index]
        assert [t for d in deltas for t in d.token_ids] == c.token_ids       # seeded: the same tokens
        assert [d.prompt_token_ids for d in deltas] == [rendered] + [None] * (len(deltas) - 1)
    assert plain.choices[0].token_ids is None and plain.choices[0].prompt_token_ids is None


def test_tool_call_text_held_back_still_passes_its_token_ids_on():
    from deployments.llm.server import _with_tool_calls
    from deployments.llm.tool_calls import FORMATS
    from deployments.types import ChoiceDelta, GenerateChunk, Usage
    pieces = ["Hi <tool_", 'call>{"name": "f", "arguments": {}}', "</tool_call>"]

    async def engine_stream():
        for k, text in enumerate(pieces):
            yield GenerateChunk([ChoiceDelta(0, text, None, token_ids=[k], prompt_token_ids=[9] if k == 0 else None)])
        yield GenerateChunk([ChoiceDelta(0, "", None, "stop", token_ids=[256])], Usage(5, 4))

    async def go():
        return [c async for c in _with_tool_calls(engine_stream(), FORMATS["hermes"])]
    deltas = [d for c in asyncio.run(go()) for d in c.choices]
    assert [t for d in deltas for t in d.token_ids] == [0, 1, 2, 256]
    assert [d.prompt_token_ids for d in deltas if d.prompt_token_ids] == [[9]]
    assert deltas[-1].tool_calls[0].name == "f"


def test_prompt_logprobs_reach_every_choice_of_a_whole_result():
    async def go():
        return await make_server().generate(chat(rid="p", prompt_logprobs=1, n=2, seed=1, temperature=1.0, max_tokens=2))
    whole = asyncio.run(go())
    rendered = list(b"<user>hi<assistant>")
    for c in whole.choices:
        assert c.prompt_logprobs[0] is None and [e[0].token_id for e in c.prompt_logprobs[1:]] == rendered[1:]
        assert all(len(e) in (1, 2) for e in c.prompt_logprobs[1:])


def test_bad_words_are_tokenized_as_vllm_does_alone_and_after_a_space():
    from types import SimpleNamespace
    vocab = {"Paris": [1, 2], " Paris": [3, 2], "ab": [4, 5], " ab": [6], "cd": [7], " cd": [7, 8]}
    tok = lambda text, add_special_tokens=True: {"input_ids": vocab[text]}   # noqa: E731
    ids = LLMServer._bad_word_ids(SimpleNamespace(tokenizer=tok), ["Paris", "  ab", "cd"])
    assert ids == [[1, 2], [3, 2], [4, 5], [7]]


def test_bad_words_reach_the_sampler_through_the_server():
    async def go():
        return await make_server().generate(chat(rid="b", bad_words=["AA"], logit_bias={65: 100.0, 66: 50.0},
                                                 max_tokens=5))
    assert asyncio.run(go()).choices[0].text == "ABABA"


@pytest.mark.parametrize("ban", [{"bad_words": ["A"]}, {"logit_bias": {65: -100.0}}])
def test_a_grammar_whose_every_next_token_is_banned_fails_that_request_alone_with_a_400(ban):
    """structured_outputs' choice "AB" with "A" banned leaves no token to draw: the request ends with a
    400 naming the conflict, rather than a token the grammar rejects, which would silently break the
    output's grammar; a request beside it is unharmed."""
    spec = {"type": "choice", "choice": ["AB"], "param": "structured_outputs"}

    async def go():
        server = tool_server()
        conflicted = GenerateRequest("c", SamplingParams(temperature=0.0, max_tokens=4, **ban),
                                     messages=[{"role": "user", "content": "hi"}], response_format=spec)
        fine = GenerateRequest("f", SamplingParams(temperature=0.0, max_tokens=4),
                               messages=[{"role": "user", "content": "hi"}], response_format=spec)
        return await asyncio.gather(server.generate(conflicted), server.generate(fine), return_exceptions=True)
    failed, ok = asyncio.run(go())
    assert isinstance(failed, InvalidRequestError) and failed.param == "structured_outputs", failed
    assert "no token" in str(failed).lower()
    assert ok.choices[0].text == "AB"
