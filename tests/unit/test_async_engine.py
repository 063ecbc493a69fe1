"""AsyncLLMEngine (async_engine.py) behind an LLMServer on the tiny model: cancellation, overload,
chunk pacing, metrics, engine ids, health and failures."""
from __future__ import annotations

import asyncio

import pytest

from deployments.config import ChatModelConfig
from deployments.errors import InvalidRequestError, OverloadedError
from deployments.llm.async_engine import AsyncLLMEngine
from deployments.llm.built_engine import BuiltEngine
from deployments.llm.engine import LLMEngine
from deployments.llm.server import LLMServer
from deployments.types import GenerateRequest, SamplingParams
from tests.unit.fakes import ByteTokenizer
from tests.unit.llm_helpers import chat, make_server, server_model

MODEL = server_model()


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


def test_concurrent_streams_each_get_their_own_output():
    async def go():
        server = make_server(max_num_seqs=4)
        alone = {c: (await server.generate(chat(rid=f"a{c}", content=c))).choices[0].text for c in "abcd"}
        together = await asyncio.gather(*(server.generate(chat(rid=f"t{c}", content=c)) for c in "abcd"))
        return alone, {c: r.choices[0].text for c, r in zip("abcd", together)}
    alone, together = asyncio.run(go())
    assert alone == together


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


def _server_with_metrics(max_num_seqs: int):
    """An LLMServer over the tiny model whose engine records into fake metrics; returns both."""
    from deployments.llm.metrics import EngineMetrics
    metrics = EngineMetrics("tiny", metrics=_FakeMetricsModule())

    def factory(_cfg):
        tok = ByteTokenizer()
        engine = LLMEngine(MODEL, tok, max_model_len=64, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096)
        return BuiltEngine(AsyncLLMEngine(engine, max_in_flight_seqs=8, metrics=metrics), tok, 64)
    return LLMServer(ChatModelConfig(id="tiny", kind="chat", source="x"), engine_factory=factory), metrics


def test_engine_metrics_record_ttft_queue_latency_tokens_and_occupancy():
    async def go():
        server, metrics = _server_with_metrics(max_num_seqs=2)
        return metrics, await asyncio.gather(*(server.generate(chat(rid=f"r{i}", max_tokens=5)) for i in range(3)))
    metrics, results = asyncio.run(go())
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


@pytest.mark.parametrize("kv_cache", ["slots", "padded"])
def test_closing_one_of_several_running_streams_leaves_the_others_running(kv_cache):
    """The client of the first row goes away: its KV row is dropped and the rows after it move down,
    on the engine thread between steps (outside the step). With slots (the CPU default) that move is
    in place, on the step's inference tensors. The others go on, with the output they get alone, and
    the engine stays up."""
    async def go():
        server = make_server(max_num_seqs=4, kv_cache=kv_cache)
        alone = {c: (await server.generate(chat(content=c, max_tokens=20))).choices[0].text for c in "bc"}
        streams = {c: server.generate_stream(chat(rid=c, content=c, max_tokens=20)) for c in "abc"}
        texts = {c: "" for c in streams}
        for _ in range(3):                       # all three are in the running batch now
            for c, s in streams.items():
                texts[c] += "".join(d.text for d in (await s.__anext__()).choices)
        await streams.pop("a").aclose()          # the first row's client went away
        for c, s in streams.items():
            async for chunk in s:
                texts[c] += "".join(d.text for d in chunk.choices)
        return server, alone, texts
    server, alone, texts = asyncio.run(asyncio.wait_for(go(), 120))
    assert {c: texts[c] for c in "bc"} == alone
    assert server.engine.is_alive() and not server.engine.engine.requests


def test_an_error_outside_a_step_stops_the_engine_and_fails_every_request_at_once():
    """A bug in the bookkeeping between steps ends the engine thread: nothing may wait on it. Every
    request in flight gets a 503 at once, new ones too, and the health check fails."""
    from deployments.errors import EngineUnavailableError

    async def go():
        server = make_server(max_num_seqs=4)
        engine = server.engine.engine
        real_abort = engine.abort

        def abort(rid):
            real_abort(rid)
            raise RuntimeError("a bug while dropping a request")
        engine.abort = abort
        other = asyncio.create_task(server.generate(chat(content="b", max_tokens=40)))
        gone = server.generate_stream(chat(content="a", max_tokens=40))
        await gone.__anext__()
        await gone.aclose()                      # its abort raises on the engine thread
        with pytest.raises(EngineUnavailableError) as info:
            await asyncio.wait_for(other, 30)     # not a hang
        with pytest.raises(RuntimeError, match="engine thread died"):
            await server.check_health()
        with pytest.raises(EngineUnavailableError):
            await server.generate(chat(max_tokens=2))
        return info.value
    err = asyncio.run(go())
    assert err.status_code == 503 and "bug" not in str(err)


def test_merged_chunks_keep_every_token_id_and_the_prompts_ids_once():
    from deployments.llm.async_engine import merge_chunks
    from deployments.types import ChoiceDelta, GenerateChunk, Usage
    chunks = [GenerateChunk([ChoiceDelta(0, "a", token_ids=[1], prompt_token_ids=[7, 8]), ChoiceDelta(1, "b", token_ids=[2],
                                                                                                        prompt_token_ids=[7, 8])]),
              GenerateChunk([ChoiceDelta(0, "", token_ids=[3])]),
              GenerateChunk([ChoiceDelta(0, "c", None, "stop", token_ids=[4]), ChoiceDelta(1, "d", None, "length", token_ids=[5])],
                            Usage(2, 5))]
    merged = merge_chunks(chunks)
    assert [(d.text, d.token_ids, d.prompt_token_ids, d.finish_reason) for d in merged.choices] == [
        ("ac", [1, 3, 4], [7, 8], "stop"), ("bd", [2, 5], [7, 8], "length")]
    assert chunks[0].choices[0].token_ids == [1] and merged.usage.completion_tokens == 5   # the inputs are not changed


def test_with_metrics_on_a_request_that_fails_alone_leaves_the_engine_running():
    """A request that fails inside a step (here: its allowed_token_ids all banned by bad_words) hands
    the metrics its error for a chunk; recording that step must not stop the engine thread, which
    would fail every request in flight and replace the replica."""
    from deployments.errors import InvalidRequestError

    async def go():
        server, metrics = _server_with_metrics(max_num_seqs=4)
        results = await asyncio.gather(server.generate(chat(rid="bad", allowed_token_ids=[65], bad_words=["A"])),
                                       server.generate(chat(rid="good", max_tokens=5)), return_exceptions=True)
        after = await server.generate(chat(rid="after", max_tokens=3))
        return server, metrics, results, after
    server, metrics, (bad, good), after = asyncio.run(go())
    assert isinstance(bad, InvalidRequestError) and bad.param == "allowed_token_ids"
    assert good.usage.completion_tokens == 5 and after.usage.completion_tokens == 3 and server.engine.is_alive()
    assert sum(metrics.generation_tokens.values) == 8 and len(metrics.e2e.values) == 2
