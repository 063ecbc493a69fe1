"""Where images returned by URL live until they expire: one small Serve deployment that every
ingress replica on every node reaches through its handle (no per-process state at the ingress).
Names are 256-bit random tokens, so a URL cannot be guessed; entries expire after a TTL.
"""
from __future__ import annotations

import heapq
import secrets
import time
from typing import Any, Optional


class ImageStore:
    def __init__(self, ttl_s: int = 3600, max_bytes: int = 1 << 30):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._items: dict[str, tuple[float, bytes]] = {}
        self._expiry: list[tuple[float, str]] = []
        self._bytes = 0

    @staticmethod
    def default_options() -> dict[str, Any]:
        return {"max_ongoing_requests": 256, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}}

    def put(self, images: list[bytes]) -> list[tuple[str, float]]:
        """Stores PNGs; returns (token, expires_at) for each."""
        self._evict()
        out = []
        for data in images:
            token, expires = secrets.token_urlsafe(32), time.time() + self.ttl_s
            self._items[token] = (expires, data)
            heapq.heappush(self._expiry, (expires, token))
            self._bytes += len(data)
            out.append((token, expires))
        while self._bytes > self.max_bytes and self._expiry:   # oldest first when over the cap
            self._drop(heapq.heappop(self._expiry)[1])
        return out

    def get(self, token: str) -> Optional[bytes]:
        item = self._items.get(token)
        if item is None or item[0] <= time.time():
            return None
        return item[1]

    def _evict(self) -> None:
        now = time.time()
        while self._expiry and self._expiry[0][0] <= now:
            self._drop(heapq.heappop(self._expiry)[1])

    def _drop(self, token: str) -> None:
        item = self._items.pop(token, None)
        if item is not None:
            self._bytes -= len(item[1])
