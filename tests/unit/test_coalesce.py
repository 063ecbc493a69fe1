"""Ingress-side coalescing of embedding requests: one handle call for many, errors stay per request."""
from __future__ import annotations

import asyncio

import numpy as np

from deployments.errors import InvalidRequestError
from deployments.types import EmbedRequest, EmbedResult
from ingress.coalesce import EmbeddingCoalescer


class RecordingClient:
    def __init__(self):
        self.calls = []

    async def embed_many(self, reqs):
        self.calls.append(len(reqs))
        await asyncio.sleep(0.01)
        out = []
        for r in reqs:
            if r.inputs == ["bad"]:
                out.append(InvalidRequestError("bad input", param="input"))
            else:
                out.append(EmbedResult(np.array([[float(len(x))] for x in r.inputs], dtype=np.float32), len(r.inputs)))
        return out


def test_concurrent_requests_share_one_call_and_keep_their_own_results():
    client = RecordingClient()

    async def go():
        co = EmbeddingCoalescer(client, max_batch=64, max_in_flight=1)
        texts = [["x" * i] for i in range(1, 21)]
        results = await asyncio.gather(*(co.embed(EmbedRequest(t)) for t in texts))
        return results

    results = asyncio.run(go())
    assert sum(client.calls) == 20 and client.calls[0] == 1 and len(client.calls) == 2   # 1 at once, 19 queued
    assert [float(r.embeddings[0, 0]) for r in results] == [float(i) for i in range(1, 21)]


def test_a_bad_request_fails_alone():
    client = RecordingClient()

    async def go():
        co = EmbeddingCoalescer(client, max_batch=8, max_in_flight=1)
        return await asyncio.gather(co.embed(EmbedRequest(["ok"])), co.embed(EmbedRequest(["bad"])),
                                    return_exceptions=True)

    good, bad = asyncio.run(go())
    assert isinstance(good, EmbedResult) and isinstance(bad, InvalidRequestError)


def test_batch_size_limit_is_respected():
    client = RecordingClient()

    async def go():
        co = EmbeddingCoalescer(client, max_batch=4, max_in_flight=1)
        await asyncio.gather(*(co.embed(EmbedRequest(["a"])) for _ in range(10)))

    asyncio.run(go())
    assert max(client.calls) <= 4 and sum(client.calls) == 10


def test_two_models_do_not_share_a_queue():
    a, b = RecordingClient(), RecordingClient()

    async def go():
        ca, cb = EmbeddingCoalescer(a, 8, 1), EmbeddingCoalescer(b, 8, 1)
        await asyncio.gather(*(c.embed(EmbedRequest(["q"])) for c in (ca, cb, ca, cb)))

    asyncio.run(go())
    assert sum(a.calls) == 2 and sum(b.calls) == 2


def test_beyond_max_pending_requests_get_503_at_once():
    from deployments.errors import OverloadedError

    async def go():
        client = RecordingClient()
        co = EmbeddingCoalescer(client, max_batch=4, max_in_flight=1, max_pending=3)
        tasks = [asyncio.create_task(co.embed(EmbedRequest([f"x{i}"]))) for i in range(6)]
        return await asyncio.gather(*tasks, return_exceptions=True)
    out = asyncio.run(go())
    overloaded = [o for o in out if isinstance(o, OverloadedError)]
    assert len(overloaded) == 2 and overloaded[0].headers["Retry-After"]   # 1 in flight, 3 waiting, 2 refused
    assert sum(isinstance(o, EmbedResult) for o in out) == 4
