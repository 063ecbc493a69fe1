"""LLMServer and AsyncLLMEngine on the tiny model: streaming, cancellation, overload, context checks."""
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
from tests.unit.fakes import ByteTokenizer, tiny_llama

MODEL = tiny_llama()


def make_server(max_num_seqs=4, max_waiting=4, max_model_len=64, **engine) -> LLMServer:
    cfg = ChatModelConfig(id="tiny", kind="chat", source="x",
                          engine={"max_num_seqs": max_num_seqs, "max_waiting": max_waiting, **engine})

    def factory(_cfg):
        tok = ByteTokenizer()
        engine = LLMEngine(MODEL, tok, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=4096)
        return BuiltEngine(AsyncLLMEngine(engine, max_in_flight_seqs=max_num_seqs + max_waiting), tok, max_model_len)
    return LLMServer(cfg, engine_factory=factory)


def chat(rid="r", content="hi", **params) -> GenerateRequest:
    return GenerateRequest(rid, SamplingParams(**{"temperature": 0.0, "max_tokens": 8, **params}),
                           messages=[{"role": "user", "content": content}])


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


def test_closing_a_stream_cancels_its_sequence_and_frees_the_slot():
    async def go():
        server = make_server(max_num_seqs=1, max_waiting=0)
        stream = server.generate_stream(chat(rid="long", max_tokens=40))
        await stream.__anext__()
        await stream.aclose()                       # the client went away
        for _ in range(100):
            if not server.engine.engine.has_work():
                break
            await asyncio.sleep(0.01)
        result = await server.generate(chat(rid="next", max_tokens=3))   # the slot is free again
        return server, result
    server, result = asyncio.run(go())
    assert result.usage.completion_tokens == 3
    assert server.engine.num_in_flight_seqs == 0 and not server.engine.engine.requests


def test_beyond_the_queue_is_overloaded_with_retry_after():
    async def go():
        server = make_server(max_num_seqs=1, max_waiting=1)
        streams = [server.generate_stream(chat(rid=f"s{i}", max_tokens=40)) for i in range(2)]
        for s in streams:                      # both are running or waiting now
            await s.__anext__()
        with pytest.raises(OverloadedError) as info:
            await server.generate(chat(rid="third"))
        for s in streams:
            await s.aclose()
        return info.value
    err = asyncio.run(go())
    assert err.status_code == 503 and err.headers["Retry-After"] == "1"


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
                    GenerateRequest("n", SamplingParams(max_tokens=2, n=99), prompts=["x"])):
            try:
                await server.generate(req)
            except InvalidRequestError as exc:
                out.append(exc.param)
        return out
    assert asyncio.run(go()) == ["prompt", "logit_bias", "n"]


def test_concurrent_streams_each_get_their_own_output():
    async def go():
        server = make_server(max_num_seqs=4)
        alone = {c: (await server.generate(chat(rid=f"a{c}", content=c))).choices[0].text for c in "abcd"}
        together = await asyncio.gather(*(server.generate(chat(rid=f"t{c}", content=c)) for c in "abcd"))
        return alone, {c: r.choices[0].text for c, r in zip("abcd", together)}
    alone, together = asyncio.run(go())
    assert alone == together


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


def test_stream_interval_grows_with_the_number_of_streams():
    engine = AsyncLLMEngine(LLMEngine(MODEL, ByteTokenizer(), max_model_len=64, max_num_seqs=4,
                                      max_num_batched_tokens=4096),
                            max_in_flight_seqs=8, stream_interval_s=0.01, max_chunks_per_s=100)
    assert engine.stream_interval() == 0.01            # idle: only the configured floor
    engine._queues.update({f"r{i}": None for i in range(32)})
    assert engine.stream_interval() == pytest.approx(0.32)   # 32 streams share 100 chunks/s


def test_under_load_tokens_are_coalesced_but_the_first_token_goes_at_once():
    async def go():
        server = make_server()
        server.engine.max_chunks_per_s = 1e-3         # any load: wait "forever" between chunks
        server.engine.stream_interval_s = 0.0
        stream = server.generate_stream(chat(rid="a", max_tokens=30))
        first = await asyncio.wait_for(stream.__anext__(), timeout=5)

        async def drain():
            return [c async for c in stream]
        rest = await asyncio.wait_for(drain(), timeout=10)   # the last chunk must end the wait
        return first, rest
    first, rest = asyncio.run(go())
    assert first.choices and first.usage is None
    assert len(rest) == 1 and rest[0].usage.completion_tokens == 30   # everything else merged into one


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


class _FakeMetric:
    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.tags, self.values = name, None, []

    def set_default_tags(self, tags):
        self.tags = tags

    def observe(self, v):
        self.values.append(v)

    def inc(self, v=1.0):
        self.values.append(v)

    def set(self, v):
        self.values.append(v)


class _FakeMetricsModule:
    Histogram = Counter = Gauge = _FakeMetric


def test_engine_metrics_record_ttft_queue_latency_tokens_and_occupancy():
    from deployments.llm.metrics import EngineMetrics
    metrics = EngineMetrics("tiny", metrics=_FakeMetricsModule())

    def factory(_cfg):
        tok = ByteTokenizer()
        engine = LLMEngine(MODEL, tok, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=4096)
        return BuiltEngine(AsyncLLMEngine(engine, max_in_flight_seqs=8, metrics=metrics), tok, 64)

    async def go():
        server = LLMServer(ChatModelConfig(id="tiny", kind="chat", source="x"), engine_factory=factory)
        return await asyncio.gather(*(server.generate(chat(rid=f"r{i}", max_tokens=5)) for i in range(3)))
    results = asyncio.run(go())
    assert metrics.ttft.tags == {"model": "tiny"}
    assert len(metrics.ttft.values) == len(metrics.queue.values) == len(metrics.e2e.values) == 3
    assert max(metrics.queue.values) > 0                      # 3 requests, 2 slots: one waited
    assert all(q <= t <= e for q, t, e in zip(sorted(metrics.queue.values), sorted(metrics.ttft.values),
                                              sorted(metrics.e2e.values)))
    assert sum(metrics.generation_tokens.values) == sum(r.usage.completion_tokens for r in results) == 15
    assert sum(metrics.prompt_tokens.values) == sum(r.usage.prompt_tokens for r in results)
    assert len(metrics.step.values) >= 5 and metrics.running.values[-1] == 0 and metrics.waiting.values[-1] == 0
    assert max(metrics.waiting.values) >= 1


class _Ranks:
    """Stands in for tp.RankGroup."""

    def __init__(self):
        self.lost = False

    def check(self):
        if self.lost:
            raise RuntimeError("a tensor-parallel rank stopped")


def test_under_tensor_parallelism_a_failed_step_stops_the_engine_and_fails_the_health_check():
    from deployments.errors import EngineUnavailableError

    async def go():
        ranks = _Ranks()
        engine = LLMEngine(MODEL, ByteTokenizer(), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=4096)
        server = LLMServer(ChatModelConfig(id="tiny", kind="chat", source="x"), engine_factory=lambda _:
                           BuiltEngine(AsyncLLMEngine(engine, max_in_flight_seqs=8, ranks=ranks), ByteTokenizer(), 64))
        await server.check_health()
        ranks.lost = True                                   # a rank's loop ended
        with pytest.raises(RuntimeError, match="rank stopped"):
            await server.check_health()
        ranks.lost = False

        def broken_step():
            raise RuntimeError("collective failed: peer closed the connection")
        engine.step = broken_step                           # e.g. the lost rank's peer in a collective
        with pytest.raises(EngineUnavailableError) as info:             # in flight: 503 too, not a 500
            await server.generate(chat(rid="a", max_tokens=5))
        assert info.value.status_code == 503 and "collective" not in str(info.value)
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError, match="engine thread died"):   # Serve replaces the replica
            await server.check_health()
        with pytest.raises(EngineUnavailableError) as info:             # meanwhile: 503, retry later
            await server.generate(chat(rid="b", max_tokens=5))
        assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "10"
    asyncio.run(go())


def test_concurrent_requests_with_one_request_id_each_get_their_own_answer():
    """A client's x-request-id reaches the server as GenerateRequest.request_id; retrying clients and
    gateways repeat it, so it must never key engine state."""
    async def go():
        server = make_server(max_num_seqs=4, max_waiting=4)
        contents = ["abc", "hello there", "zz", "a longer prompt"]
        return contents, await asyncio.wait_for(asyncio.gather(
            *(server.generate(chat(rid="same-id", content=c, max_tokens=6 + i)) for i, c in enumerate(contents))), 60)
    contents, results = asyncio.run(go())
    async def alone(c, i):
        return await make_server().generate(chat(rid="x", content=c, max_tokens=6 + i))
    for i, (c, r) in enumerate(zip(contents, results)):
        assert r.usage.completion_tokens == 6 + i
        assert r.choices[0].text == asyncio.run(alone(c, i)).choices[0].text


def test_a_request_that_can_never_fit_is_400_not_a_503_to_retry_forever():
    async def go():
        server = make_server(max_num_seqs=2, max_waiting=2)
        prompts = GenerateRequest("p", SamplingParams(max_tokens=2), prompts=["a"] * 5)
        with pytest.raises(InvalidRequestError) as many:
            await server.generate(prompts)
        with pytest.raises(InvalidRequestError) as wide:
            await server.generate(chat(n=5))
        return many.value, wide.value, await server.generate(chat(n=4))
    many, wide, fits = asyncio.run(go())
    assert many.param == "prompt" and "max_num_seqs + engine.max_waiting" in many.message and many.status_code == 400
    assert wide.param == "n" and len(fits.choices) == 4


def test_a_request_that_fails_to_enter_the_engine_fails_alone():
    async def go():
        server = make_server()
        engine = server.engine.engine
        real_add = engine.add

        def add(r):
            if r.params.max_tokens == 7:
                raise RuntimeError("a bug while building the request")
            real_add(r)
        engine.add = add
        bad, good = await asyncio.gather(server.generate(chat(max_tokens=7)), server.generate(chat(max_tokens=5)),
                                         return_exceptions=True)
        return server, bad, good
    server, bad, good = asyncio.run(go())
    assert isinstance(bad, RuntimeError) and good.usage.completion_tokens == 5
    assert server.engine.is_alive()


def test_a_wedged_step_fails_the_health_check():
    import threading
    release = threading.Event()

    async def go():
        server = make_server()
        server.engine.step_timeout_s = 0.2
        engine = server.engine.engine
        real_step = engine.step
        engine.step = lambda: (release.wait(30), real_step())[1]
        task = asyncio.create_task(server.generate(chat(max_tokens=2)))
        failure = None
        for _ in range(600):   # until the step has run past the timeout
            try:
                await server.check_health()
            except RuntimeError as exc:
                failure = exc
                break
            await asyncio.sleep(0.05)
        assert failure is not None and "step running for over" in str(failure)
        release.set()
        await task
        await server.check_health()   # it moved again: healthy
    asyncio.run(go())


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
