"""ingress/ratelimit.py: shares leased from one LimitStore by several replicas (in-process), 429s and
their headers, token reservations settled against usage, concurrency, and the store-lost modes."""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from deployments.config import AuthConfig, RateLimits
from ingress.limit_store import LimitStore
from ingress.ratelimit import RateLimiter, RateLimitError, duration, reservation
from ingress.usage import UsageMeter
from tests.unit.test_api import CHAT, EMB, make_app, raw_client, run


class StoreHandle:
    """A LimitStore behind `.method.remote(arg)`, like its Serve handle; `down` makes every call fail."""

    def __init__(self, store: LimitStore | None = None):
        self.store = store or LimitStore()
        self.down = False
        self.calls = 0

    def __getattr__(self, name):
        method = getattr(self.store, name)

        class _M:
            @staticmethod
            async def remote(arg):
                self.calls += 1
                await asyncio.sleep(0)
                if self.down:
                    raise ConnectionError("store lost")
                return method(arg)
        return _M


class Recorder:
    def __init__(self):
        self.values: dict = {}

    def inc(self, value, tags):
        key = (tags["subject"], tags["model"])
        self.values[key] = self.values.get(key, 0) + value


def limiter(handle, **kw) -> RateLimiter:
    return RateLimiter(handle, meter=UsageMeter({k: Recorder() for k in ("requests", "prompt_tokens",
                                                                         "completion_tokens", "embedding_tokens",
                                                                         "images")}), **kw)


async def admit_many(replicas, limits, n):
    async def one(i):
        try:
            await replicas[i % len(replicas)].admit("s", limits)
            return True
        except RateLimitError:
            return False
    return sum(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize("rpm,fraction", [(50, 0.02), (600, 0.05)])
def test_two_replicas_admit_no_more_than_the_limit(rpm, fraction):
    async def go():
        handle = StoreHandle()
        replicas = [limiter(handle, lease_fraction=fraction) for _ in range(2)]
        admitted = await admit_many(replicas, RateLimits(requests_per_minute=rpm), 3 * rpm)
        return admitted, handle.calls
    admitted, calls = run(go())
    # never over the limit (plus what the bucket refills while the test runs: rpm/60 per second)
    assert admitted <= rpm + 1
    # under it by at most the shares the replicas hold (one lease each)
    assert admitted >= rpm - 2 * max(1, rpm * fraction)
    assert calls < 3 * rpm   # not one store call per request


def test_a_replica_spends_its_share_locally():
    async def go():
        handle = StoreHandle()
        lim = limiter(handle, lease_fraction=0.1)
        for _ in range(50):
            await lim.admit("s", RateLimits(requests_per_minute=1000))
        return handle.calls
    assert run(go()) <= 50 / 100 * 2 + 2   # a 100-request share, topped up in the background


def test_denial_says_when_to_retry_and_carries_the_headers():
    async def go():
        lim = limiter(StoreHandle())
        limits = RateLimits(requests_per_minute=2)
        await lim.admit("s", limits)
        await lim.admit("s", limits)
        with pytest.raises(RateLimitError) as err:
            await lim.admit("s", limits)
        return err.value
    err = run(go())
    assert err.status_code == 429 and err.type == "requests" and err.code == "rate_limit_exceeded"
    assert 1 <= int(err.headers["Retry-After"]) <= 31
    assert err.headers["x-ratelimit-limit-requests"] == "2"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"].endswith("s")


def test_subjects_do_not_share_buckets():
    async def go():
        lim = limiter(StoreHandle())
        limits = RateLimits(requests_per_minute=1)
        await lim.admit("a", limits)
        await lim.admit("b", limits)
        with pytest.raises(RateLimitError):
            await lim.admit("a", limits)
    run(go())


def test_concurrency_slots_are_freed_when_requests_end():
    async def go():
        handle = StoreHandle()
        a, b = limiter(handle), limiter(handle)
        limits = RateLimits(concurrent_requests=2)
        t1 = await a.admit("s", limits)
        await b.admit("s", limits)
        with pytest.raises(RateLimitError):
            await a.admit("s", limits)
        t1.close(failed=False)
        await a.admit("s", limits)   # the freed slot is reused locally
        with pytest.raises(RateLimitError):
            await b.admit("s", limits)
    run(go())


class Body:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_token_reservation_is_settled_against_usage():
    async def go():
        lim = limiter(StoreHandle(), lease_fraction=1.0)
        limits = RateLimits(tokens_per_minute=1000)
        ticket = await lim.admit("s", limits)
        await ticket.reserve(Body(messages="x" * 400, max_tokens=500, n=1))   # ~100 + 500 reserved
        before = lim.pool_of("s", "tokens").remaining()
        ticket.settle("m", prompt_tokens=100, completion_tokens=50)            # used 150
        after = lim.pool_of("s", "tokens").remaining()
        big = await lim.admit("s", limits)
        with pytest.raises(RateLimitError) as err:
            await big.reserve(Body(messages="x", max_tokens=5000, n=1))
        return before, after, err.value
    before, after, err = run(go())
    assert before == pytest.approx(400, abs=2) and after == pytest.approx(850, abs=2)
    assert err.type == "tokens" and "Request too large" in err.message


def test_a_failed_request_gets_its_tokens_back():
    async def go():
        lim = limiter(StoreHandle(), lease_fraction=1.0)
        ticket = await lim.admit("s", RateLimits(tokens_per_minute=1000))
        await ticket.reserve(Body(input="x" * 400))
        ticket.close(failed=True)
        return lim.pool_of("s", "tokens").remaining()
    assert run(go()) == pytest.approx(1000, abs=2)


def test_reservation_estimates():
    assert reservation(Body(input=["abcd", "abcdefgh"]), 1024) == 3
    assert reservation(Body(input=[[1, 2, 3]]), 1024) == 3
    assert reservation(Body(prompt="x" * 40, max_tokens=16, n=2), 1024) == 10 + 32
    assert reservation(Body(prompt="x" * 40, max_tokens=0, n=2), 1024) == 10   # completions' echo: no output
    assert reservation(Body(messages=[Body(role="user", content="x" * 40)], max_tokens=None,
                            max_completion_tokens=None, n=None), 100) == 1 + 10 + 100


def test_idle_shares_go_back_to_the_store():
    async def go():
        handle = StoreHandle()
        a = limiter(handle, lease_fraction=0.5)
        b = limiter(handle, lease_fraction=0.5)
        limits = RateLimits(requests_per_minute=10)
        await a.admit("s", limits)       # a leases half the bucket and spends one
        await asyncio.sleep(0.01)        # its background top-up
        await a.sync_once()              # used since the last tick: kept
        await a.sync_once()              # idle for one tick: still kept
        assert handle.store.exchange([("s", "requests", 10, 10 / 60, 0, 0)])[0][1] < 6
        await a.sync_once()              # idle for two ticks: returned
        admitted = await admit_many([b], limits, 20)
        return admitted
    assert run(go()) == 9


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_when_the_store_is_lost(mode):
    async def go():
        handle = StoreHandle()
        handle.down = True
        lim = limiter(handle, failure=mode)
        return await lim.admit("s", RateLimits(requests_per_minute=5))
    if mode == "open":
        run(go())
    else:
        with pytest.raises(Exception) as err:
            run(go())
        assert err.value.status_code == 503 and "Retry-After" in err.value.headers


def test_duration_format():
    assert [duration(s) for s in (0.02, 1.5, 59.999, 360)] == ["20ms", "1.5s", "60s", "6m0s"]


# ----------------------------------------------------------------------------- over HTTP

def limited_app(limits: dict, **kw):
    keys = [{"sha256": hashlib.sha256(b"k").hexdigest(), "subject": "team", "limits": limits}]
    meter = UsageMeter({k: Recorder() for k in ("requests", "prompt_tokens", "completion_tokens",
                                                "embedding_tokens", "images")})
    return make_app(auth=AuthConfig(keys=keys), limit_store=StoreHandle(), meter=meter, **kw), meter


def test_429_and_success_headers_over_http():
    app, _ = limited_app({"requests_per_minute": 3, "tokens_per_minute": 10000})
    auth = {"Authorization": "Bearer k"}

    async def go():
        async with raw_client(app) as h:
            return [await h.post("/v1/embeddings", json={"model": EMB, "input": "abcd"}, headers=auth)
                    for _ in range(4)]
    responses = run(go())
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    ok, denied = responses[0], responses[3]
    for name in ("limit-requests", "remaining-requests", "reset-requests", "limit-tokens", "remaining-tokens",
                 "reset-tokens"):
        assert f"x-ratelimit-{name}" in ok.headers, name
    assert ok.headers["x-ratelimit-limit-requests"] == "3" and ok.headers["x-ratelimit-remaining-requests"] == "2"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 10000 - 4   # settled: "abcd" is 4 tokens
    assert denied.headers["retry-after"].isdigit() and denied.headers["x-ratelimit-remaining-requests"] == "0"
    err = denied.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests" and "x-request-id" in denied.headers


def test_a_token_429_from_the_route_has_each_header_once():
    app, _ = limited_app({"requests_per_minute": 100, "tokens_per_minute": 50})
    auth = {"Authorization": "Bearer k"}

    async def go():
        async with raw_client(app) as h:
            return await h.post("/v1/chat/completions", json={
                "model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100}, headers=auth)
    r = run(go())
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
    names = [k for k, _ in r.headers.multi_items() if k.startswith("x-ratelimit")]
    assert sorted(names) == sorted(set(names)) and "x-ratelimit-remaining-requests" in names


def test_usage_is_recorded_per_subject_and_model():
    app, meter = limited_app({"requests_per_minute": 100})
    auth = {"Authorization": "Bearer k"}

    async def go():
        async with raw_client(app) as h:
            await h.post("/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "abc"}],
                                                       "n": 2}, headers=auth)
            r = await h.post("/v1/chat/completions", json={"model": CHAT, "stream": True, "messages": [
                {"role": "user", "content": "ab"}]}, headers=auth)
            assert r.status_code == 200
            await h.post("/v1/embeddings", json={"model": EMB, "input": ["ab", "cde"]}, headers=auth)
            await h.post("/v1/images/generations", json={"prompt": "p", "n": 2, "response_format": "b64_json"},
                         headers=auth)
            await h.post("/v1/chat/completions", json={"model": CHAT, "messages": [], "n": 2}, headers=auth)  # 400
    run(go())
    got = {name: c.values for name, c in meter.counters.items()}
    assert got["requests"] == {("team", CHAT): 2, ("team", EMB): 1, ("team", "fake-image"): 1}
    assert got["prompt_tokens"] == {("team", CHAT): 6}            # the fake reports 3 per request
    assert got["completion_tokens"] == {("team", CHAT): 6 + 2}    # "cba" twice, then "ba"
    assert got["embedding_tokens"] == {("team", EMB): 5}
    assert got["images"] == {("team", "fake-image"): 2}
