"""Signed image URLs: `.../v1/images/files/<token>.png?expires=<unix s>&signature=<HMAC-SHA256>`.

The secret comes from config (auth.image_url_secret_env/_file), so any ingress replica, also after a
restart, verifies a URL another one signed; without one, the image store's own secret is used (it
lives exactly as long as the images). Must not import torch.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any, Optional


class ImageUrlSigner:
    def __init__(self, secret: Optional[bytes], store: Any):
        self._secret = secret
        self._store = store

    async def query(self, token: str, expires: float) -> str:
        """The query string that makes the URL of `token` valid until `expires`."""
        exp = str(int(expires))
        return f"expires={exp}&signature={self._mac(await self._key(), token, exp)}"

    async def verify(self, token: str, expires: str, signature: str) -> bool:
        """Whether the signature is ours and the URL has not expired (constant-time compare)."""
        if not expires.isdigit() or int(expires) <= time.time():
            return False
        return hmac.compare_digest(self._mac(await self._key(), token, expires), signature)

    async def _key(self) -> bytes:
        if self._secret is None:
            self._secret = await self._store.url_secret.remote()
        return self._secret

    @staticmethod
    def _mac(key: bytes, token: str, expires: str) -> str:
        digest = hmac.new(key, f"{token}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
