"""Where images returned by URL live until they expire: one small Serve deployment that every
ingress replica on every node reaches through its handle (no per-process state at the ingress).
Bounded in bytes overall and per subject: over its quota a subject's own oldest images go, never
another's. Names are 256-bit random tokens; URLs also carry the ingress's HMAC signature and expiry.
Must not import torch or FastAPI.
"""
from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any, Optional

from deployments.errors import OverloadedError


class ImageStore:
    def __init__(self, ttl_s: int = 3600, max_bytes: int = 1 << 30, quota_bytes: int = 256 << 20):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.quota_bytes = min(quota_bytes, max_bytes)
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()   # oldest first (one TTL)
        self._by_subject: dict[str, OrderedDict[str, int]] = {}
        self._subject_bytes: dict[str, int] = {}
        self._bytes = 0
        self._url_secret = secrets.token_bytes(32)

    @staticmethod
    def default_options() -> dict[str, Any]:
        return {"max_ongoing_requests": 256, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}}

    def url_secret(self) -> bytes:
        """The URL-signing secret for ingress replicas configured without one: it lives exactly as
        long as the images it signs."""
        return self._url_secret

    def put(self, images: list[bytes], subject: str = "anonymous") -> list[tuple[str, float]]:
        """Stores PNGs for `subject`; returns (token, expires_at) for each. Over the subject's quota its
        own oldest images are dropped; if the whole store is still full, 503 (no one else's go)."""
        self._evict_expired()
        size = sum(len(d) for d in images)
        if size > self.quota_bytes:
            raise OverloadedError("These images are larger than the image store keeps for one caller; "
                                  "ask for response_format=b64_json.", retry_after_s=1)
        self._make_room(subject, size)
        out = []
        for data in images:
            token, expires = secrets.token_urlsafe(32), time.time() + self.ttl_s
            self._items[token] = (expires, data, subject)
            self._by_subject.setdefault(subject, OrderedDict())[token] = len(data)
            self._subject_bytes[subject] = self._subject_bytes.get(subject, 0) + len(data)
            self._bytes += len(data)
            out.append((token, expires))
        return out

    def get(self, token: str) -> Optional[bytes]:
        item = self._items.get(token)
        if item is None or item[0] <= time.time():
            return None
        return item[1]

    def usage(self) -> dict[str, int]:
        """Bytes kept per subject."""
        return dict(self._subject_bytes)

    def _make_room(self, subject: str, size: int) -> None:
        own = self._by_subject.get(subject, OrderedDict())
        while own and self._subject_bytes.get(subject, 0) + size > self.quota_bytes:
            self._drop(next(iter(own)))
        if self._bytes + size > self.max_bytes:
            wait = next(iter(self._items.values()))[0] - time.time() if self._items else 1
            raise OverloadedError("The image store is full; retry later or ask for response_format=b64_json.",
                                  retry_after_s=max(1, int(wait)))

    def _evict_expired(self) -> None:
        now = time.time()
        while self._items:
            token, (expires, _, _) = next(iter(self._items.items()))
            if expires > now:
                break
            self._drop(token)

    def _drop(self, token: str) -> None:
        expires, data, subject = self._items.pop(token)
        own = self._by_subject[subject]
        del own[token]
        self._bytes -= len(data)
        self._subject_bytes[subject] -= len(data)
        if not own:
            del self._by_subject[subject], self._subject_bytes[subject]
