"""Per-client limits (ingress/client_limit.py): checked before the body is read and before auth, keyed
by network address only (X-Forwarded-For believed from trusted proxies alone), 429 with Retry-After."""
from __future__ import annotations

import os

import httpx2
import pytest
from pydantic import ValidationError

from deployments.config import AuthConfig, ClientLimits
from ingress import client_limit
from ingress.client_limit import ClientThrottle
from tests.unit.test_api import make_app, run


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(client_limit.time, "monotonic", c)
    return c


def scope(peer: str, forwarded: str | None = None, path: str = "/v1/models") -> dict:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded is not None else []
    return {"type": "http", "path": path, "client": (peer, 5000), "headers": headers}


def test_a_client_gets_its_burst_then_the_rate_and_429_says_when_to_retry(clock):
    t = ClientThrottle(ClientLimits(requests_per_s=2, burst=3))
    assert [t.admit("a") for _ in range(3)] == [None] * 3
    refused = t.admit("a")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1" and refused.type == "requests"
    assert t.admit("b") is None            # another client is untouched
    clock.now += 0.5                       # one token back at 2 per second
    assert t.admit("a") is None and t.admit("a") is not None


def test_concurrent_requests_per_client_are_capped_until_one_ends(clock):
    t = ClientThrottle(ClientLimits(max_concurrent=2))
    assert t.admit("a") is None and t.admit("a") is None
    assert t.admit("a").status_code == 429
    t.release("a")
    assert t.admit("a") is None


def test_forwarded_for_is_believed_only_from_a_trusted_proxy():
    plain = ClientThrottle(ClientLimits(requests_per_s=1))
    assert plain.client_of(scope("10.0.0.5", "1.2.3.4")) == "10.0.0.5"   # a client cannot pick its own key
    lb = ClientThrottle(ClientLimits(requests_per_s=1, trusted_proxies=["10.0.0.0/8"]))
    assert lb.client_of(scope("10.0.0.5", "1.2.3.4")) == "1.2.3.4"
    # the client wrote the leftmost hops itself: the key is the last hop no trusted proxy added
    assert lb.client_of(scope("10.0.0.5", "6.6.6.6, 1.2.3.4, 10.0.0.9")) == "1.2.3.4"
    assert lb.client_of(scope("10.0.0.5")) == "10.0.0.5"
    assert lb.client_of(scope("8.8.8.8", "1.2.3.4")) == "8.8.8.8"       # not from the balancer


def test_per_address_limits_behind_ray_haproxy_need_trusted_proxies(monkeypatch):
    """Behind Ray's HAProxy every peer is HAProxy: a limit with no trusted proxies would be one shared
    count, so the ingress refuses to start with it (and says what to do)."""
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    with pytest.raises(ValueError, match="trusted_proxies"):
        ClientThrottle(ClientLimits(max_concurrent=2))
    with pytest.raises(ValueError, match="HAProxy"):
        ClientThrottle(ClientLimits(requests_per_s=1))
    behind = ClientThrottle(ClientLimits(max_concurrent=2, trusted_proxies=["127.0.0.1/32"]))
    assert behind.client_of(scope("127.0.0.1", "1.2.3.4")) == "1.2.3.4"
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")   # Serve's own proxy passes the client's address on
    ClientThrottle(ClientLimits(max_concurrent=2))


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4():
    t = ClientThrottle(ClientLimits(requests_per_s=1))
    assert t.client_of(scope("2001:db8:1:2::1")) == t.client_of(scope("2001:db8:1:2:ffff::9")) == "2001:db8:1:2::/64"
    assert t.client_of(scope("2001:db8:1:3::1")) != t.client_of(scope("2001:db8:1:2::1"))
    assert t.client_of(scope("::ffff:1.2.3.4")) == "1.2.3.4"


def test_tracked_clients_are_bounded_forgetting_the_least_recently_seen(clock):
    t = ClientThrottle(ClientLimits(requests_per_s=1, burst=1, max_clients=2))
    assert t.admit("a") is None and t.admit("b") is None
    assert t.admit("a") is not None        # a is out of tokens, and now the most recently seen
    assert t.admit("c") is None            # b is forgotten, not a
    assert t.admit("a") is not None and set(t._clients) == {"a", "c"}


def test_bad_proxy_networks_are_refused_at_config_time():
    with pytest.raises(ValidationError, match="not-a-network"):
        ClientLimits(trusted_proxies=["not-a-network"])


# ----------------------------------------------------------------------------- over HTTP


def keyed_app(**limits):
    os.environ["TEST_MODELHUB_CLIENT_KEYS"] = "k1"
    return make_app(auth=AuthConfig(api_keys_env="TEST_MODELHUB_CLIENT_KEYS"), client_limits=ClientLimits(**limits))


def client_at(app, address: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app, client=(address, 1234)), base_url="http://test")


def test_a_flood_of_bad_credentials_is_refused_before_auth_and_other_clients_are_not(clock):
    app = keyed_app(requests_per_s=1, burst=3)

    async def go():
        async with client_at(app, "9.9.9.9") as flood, client_at(app, "1.1.1.1") as other:
            bad = {"Authorization": "Bearer wrong"}
            flooded = [await flood.get("/v1/models", headers=bad) for _ in range(5)]
            probes = [await flood.get(path) for path in ("/health", "/ready")]
            good = await other.get("/v1/models", headers={"Authorization": "Bearer k1"})
            return flooded, probes, good
    flooded, probes, good = run(go())
    assert [r.status_code for r in flooded] == [401, 401, 401, 429, 429]
    err = flooded[3].json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "per second" in err["message"] and set(err) == {
        "message", "type", "param", "code"}
    assert flooded[3].headers["retry-after"] == "1"
    assert [r.status_code for r in probes] == [200, 200]   # orchestrators' probes are never limited
    assert good.status_code == 200


def test_a_limited_client_is_refused_before_its_body_is_read(clock):
    app = keyed_app(requests_per_s=1, burst=1)
    pulled = []

    async def go():
        async def body():
            for _ in range(100):
                pulled.append(1)
                yield b" " * 65536
        async with client_at(app, "9.9.9.9") as flood:
            await flood.get("/v1/models")
            pulled.clear()
            return await flood.post("/v1/embeddings", content=body(), headers={"content-type": "application/json"})
    r = run(go())
    assert r.status_code == 429 and len(pulled) <= 1   # the transport may pull one chunk before the answer


def test_off_by_default():
    assert not ClientLimits().enabled

    async def go():
        async with client_at(make_app(), "9.9.9.9") as h:
            return [(await h.get("/v1/models")).status_code for _ in range(150)]
    assert set(run(go())) == {200}
