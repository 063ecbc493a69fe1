"""Per-client admission, the first check a request meets (from middleware.py): before its body is read
and before it is authenticated, so one address flooding the ingress (with bodies it will refuse, or
bad credentials) is turned away for the cost of a dict lookup and cannot take the ingress's CPU from
everyone else.

A client is a network address, never a value the client chose: the peer's address, or, when the
peer is a trusted proxy, the last `X-Forwarded-For` hop that is not one. IPv6 addresses count per /64,
the block one host usually holds. Counts are per ingress replica (config.ClientLimits says why that
is enough for a flood guard). Never imports torch.
"""
from __future__ import annotations

import ipaddress
import os
import time
from collections import OrderedDict
from typing import Optional

from deployments.config import ClientLimits
from ingress.ratelimit import RateLimitError

_UNLIMITED_PATHS = ("/health", "/ready")   # probes from orchestrators are never refused


class _Client:
    __slots__ = ("tokens", "stamp", "in_flight")

    def __init__(self, tokens: float, stamp: float):
        self.tokens, self.stamp, self.in_flight = tokens, stamp, 0


class ClientThrottle:
    def __init__(self, cfg: ClientLimits):
        check_behind_haproxy(cfg)
        self.rate, self.burst, self.max_concurrent = cfg.requests_per_s, float(cfg.burst), cfg.max_concurrent
        self.max_clients = cfg.max_clients
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.trusted_proxies]
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def limits(self, scope) -> bool:
        return not scope.get("path", "").endswith(_UNLIMITED_PATHS)

    def client_of(self, scope) -> str:
        """The client's key: its address (per /64 for IPv6), through trusted proxies only."""
        peer = (scope.get("client") or ("",))[0] or ""
        if self.trusted and self._trusted(peer):
            hops = [h.strip() for k, v in scope.get("headers", ()) if k == b"x-forwarded-for"
                    for h in v.decode("latin-1").split(",") if h.strip()]
            peer = next((h for h in reversed(hops) if not self._trusted(h)), hops[0] if hops else peer)
        return _key(peer)

    def admit(self, key: str) -> Optional[RateLimitError]:
        """None, counting the request in flight (release() ends it), or the 429 to answer with."""
        now = time.monotonic()
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(self.burst, now)
            if len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)   # the least recently seen
        else:
            self._clients.move_to_end(key)
        if self.max_concurrent is not None and client.in_flight >= self.max_concurrent:
            return RateLimitError(f"Too many concurrent requests from this client (limit {self.max_concurrent}).",
                                  kind="requests", retry_after_s=1, headers={})
        if self.rate is not None:
            client.tokens = min(self.burst, client.tokens + (now - client.stamp) * self.rate)
            client.stamp = now
            if client.tokens < 1:
                return RateLimitError(f"Too many requests from this client (limit {self.rate:g} per second).",
                                      kind="requests", retry_after_s=(1 - client.tokens) / self.rate, headers={})
            client.tokens -= 1
        client.in_flight += 1
        return None

    def release(self, key: str) -> None:
        client = self._clients.get(key)
        if client is not None:   # None: forgotten while in flight (more than max_clients clients)
            client.in_flight -= 1

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)


def check_behind_haproxy(cfg: ClientLimits) -> None:
    """Refuses per-address limits that would not be per address. Behind Ray's HAProxy ingress
    (RAY_SERVE_ENABLE_HA_PROXY=1) every request reaches the ingress from HAProxy's own address, and
    HAProxy adds no `X-Forwarded-For`: without trusted proxies, all clients would share one count."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" and cfg.enabled and not cfg.trusted_proxies:
        raise ValueError(
            "ingress.client_limits: behind Ray's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) every request "
            "comes from HAProxy's address, so a per-address limit would be one limit for all clients. Put a "
            "load balancer that sets X-Forwarded-For in front and list the HAProxy nodes' network in "
            "trusted_proxies, or limit per tenant (auth.limits) instead.")


def _key(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:   # not an IP (a unix socket, a test client): the string itself, bounded
        return address[:64]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
