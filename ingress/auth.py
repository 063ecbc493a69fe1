"""The one place credentials are checked: `Authorization: Bearer <key>` against the configured keys.

Keys come from an environment variable named in the config (never from the config itself) and
are compared in constant time. With no keys configured, the API is open (local use).
"""
from __future__ import annotations

import hmac
import os
from typing import Optional

from fastapi import Request

from deployments.errors import AuthenticationError


class ApiKeyAuth:
    def __init__(self, env_var: Optional[str]):
        raw = os.environ.get(env_var, "") if env_var else ""
        self._keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
        if env_var and not self._keys:
            raise RuntimeError(f"api_keys_env is {env_var!r} but that environment variable holds no keys")

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    async def __call__(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", code=None)
        given = key.strip().encode()
        if not any(hmac.compare_digest(given, k) for k in self._keys):
            raise AuthenticationError("Incorrect API key provided.")
