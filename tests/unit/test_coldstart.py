"""ColdStartGuard: a call to a model at zero replicas waits for one to start, up to the bound; after
it the call is cancelled and the client gets a 503 with Retry-After; a running model is never held."""
from __future__ import annotations

import asyncio

import pytest

from deployments.errors import OverloadedError
from deployments.types import GenerateChunk
from ingress.coldstart import ColdStartGuard


class SlowModel:
    """Answers once `started` is set (a replica came up); records cancellations."""

    def __init__(self):
        self.started = asyncio.Event()
        self.cancelled = 0

    async def embed(self, req):
        try:
            await self.started.wait()
            return "vectors"
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def generate_stream(self, req):
        await self.started.wait()
        for i in range(3):
            yield GenerateChunk([], None) if i else "first"


def _guard(model, replicas: list[int], timeout_s: float):
    async def running():
        return replicas[0]
    return ColdStartGuard(model, "m", running, timeout_s, poll_s=0.01)


def test_a_call_waits_for_the_cold_start_and_then_is_not_bounded():
    async def go():
        model, replicas = SlowModel(), [0]
        guard = _guard(model, replicas, timeout_s=0.3)
        call = asyncio.ensure_future(guard.embed("req"))
        await asyncio.sleep(0.1)
        replicas[0] = 1   # the replica runs within the bound; its answer may take longer than the bound
        await asyncio.sleep(0.5)
        model.started.set()
        return await call
    assert asyncio.run(go()) == "vectors"


def test_no_replica_within_the_bound_is_a_503_with_retry_after_and_the_call_is_cancelled():
    async def go():
        model = SlowModel()
        with pytest.raises(OverloadedError) as info:
            await _guard(model, [0], timeout_s=0.2).embed("req")
        await asyncio.sleep(0)
        return info.value, model.cancelled
    err, cancelled = asyncio.run(go())
    assert err.status_code == 503 and err.headers["Retry-After"] == "1" and err.code == "model_starting"
    assert "did not start within 0.2 s" in str(err) and cancelled == 1


def test_a_stream_is_bounded_until_its_first_chunk_only():
    async def go():
        model, replicas = SlowModel(), [0]
        with pytest.raises(OverloadedError):
            async for _ in _guard(model, replicas, timeout_s=0.1).generate_stream("req"):
                pass
        model.started.set()
        return [c async for c in _guard(model, replicas, timeout_s=0.1).generate_stream("req")]
    assert len(asyncio.run(go())) == 3


def test_a_running_model_is_called_directly():
    async def go():
        model = SlowModel()
        model.started.set()
        return await _guard(model, [2], timeout_s=0.000001).embed("req")
    assert asyncio.run(go()) == "vectors"


def test_the_guard_serves_every_call_a_model_client_has():
    # a rerank model at zero answered 500 once: the guard had no `score`
    import inspect

    from ingress.backends import ModelClient
    calls = [name for name, _ in inspect.getmembers(ModelClient, inspect.isfunction) if not name.startswith("_")]
    assert {"score", "tokenize", "detokenize", "generate_stream", "embed"} <= set(calls)
    missing = [name for name in calls if not callable(getattr(ColdStartGuard, name, None))]
    assert not missing, missing

    class Scorer:
        async def score(self, req):
            return "scores"

        async def detokenize(self, tokens):
            return "text"

    async def go():
        guard = _guard(Scorer(), [1], timeout_s=1)
        return await guard.score("req"), await guard.detokenize([1, 2])
    assert asyncio.run(go()) == ("scores", "text")
