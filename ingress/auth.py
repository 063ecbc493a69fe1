"""The one place credentials are checked: `Authorization: Bearer <credential>` -> a Principal
(subject, allowed models, limits), from static API keys (kept only as SHA-256 hashes) or JWTs
(PyJWT). `Guard` is the ASGI middleware that authenticates every non-public path and admits the
request against its subject's rate limits. Must not import torch.
"""
from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Optional

import jwt

from deployments.config import AuthConfig, JwtConfig, RateLimits
from deployments.errors import AuthenticationError, ModelNotFoundError

logger = logging.getLogger("modelhub.ingress")

# Reachable without credentials: probes, and image URLs (their HMAC signature is the capability).
PUBLIC_PATHS = frozenset({"/health", "/ready"})
PUBLIC_FILES = "/v1/images/files/"

MISSING = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
           "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
INCORRECT = "Incorrect API key provided."   # the same for every failed check: no oracle for attackers


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: `subject` labels its limits and usage; `models` are glob patterns."""

    subject: str
    models: tuple[str, ...] = ("*",)
    limits: Optional[RateLimits] = None

    def allows(self, model_id: str) -> bool:
        return any(p == "*" or p == model_id or fnmatch.fnmatchcase(model_id, p) for p in self.models)

    def check_model(self, model_id: str) -> None:
        """An out-of-scope model answers exactly as an absent one does."""
        if not self.allows(model_id):
            raise ModelNotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.")


ANONYMOUS = Principal("anonymous")


def is_public(scope: dict) -> bool:
    """Whether the path, below the app's route prefix (Serve's root_path), needs no credential."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    return path in PUBLIC_PATHS or (path.startswith(PUBLIC_FILES) and "/" not in path[len(PUBLIC_FILES):])


def read_secret(env: Optional[str], path: Optional[str], what: str) -> Optional[bytes]:
    """A secret from an environment variable or a file (stripped); a named source that is empty fails."""
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            raise RuntimeError(f"{what}: environment variable {env!r} is empty or unset")
        return value.encode()
    if path:
        value = pathlib.Path(path).read_text().strip()
        if not value:
            raise RuntimeError(f"{what}: file {path!r} is empty")
        return value.encode()
    return None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class StaticKeys:
    """API keys by SHA-256. A lookup keyed by the hash of the presented key is safe against timing
    attacks: how long it takes says nothing about the bytes of any valid key."""

    def __init__(self, cfg: AuthConfig):
        default = tuple(cfg.default_models)
        raw = []
        if cfg.api_keys_env:
            raw += [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
            if not raw:
                raise RuntimeError(f"api_keys_env is {cfg.api_keys_env!r} but that environment variable holds no keys")
        if cfg.api_keys_file:
            lines = pathlib.Path(cfg.api_keys_file).read_text().splitlines()
            raw += [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]
        self._by_hash: dict[str, Principal] = {}
        for key in raw:
            h = _digest(key)
            self._by_hash[h] = Principal(f"key-{h[:12]}", default, None)
        for entry in cfg.keys:
            models = tuple(entry.models) if entry.models is not None else default
            self._by_hash[entry.sha256] = Principal(entry.subject, models, entry.limits)

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, key: str) -> Optional[Principal]:
        return self._by_hash.get(_digest(key))


class JwtVerifier:
    """Verifies a JWT's signature (pinned algorithms), exp/nbf (with leeway), iss and aud, then maps its
    claims to a Principal. Verified tokens are remembered until they expire (at most `remember_s`), so
    a client reusing its token costs a dict lookup, not a signature check."""

    remember_s = 60.0
    max_remembered = 10_000

    def __init__(self, cfg: JwtConfig, default_models: tuple[str, ...]):
        self.cfg = cfg
        self.default_models = default_models
        self.algorithms = list(cfg.algorithms)
        self._secret = read_secret(cfg.secret_env, cfg.secret_file, "auth.jwt secret")
        self._public_key = None
        if cfg.public_key_file:
            self._public_key = pathlib.Path(cfg.public_key_file).read_bytes()
        self._jwks = None
        opts = {"cache_jwk_set": True, "lifespan": cfg.jwks_cache_s, "timeout": 10,
                "cooldown_duration": cfg.jwks_refetch_cooldown_s}
        if cfg.jwks_url:
            self._jwks = jwt.PyJWKClient(cfg.jwks_url, **opts)
        elif cfg.jwks_file:
            self._jwks = FileJWKClient(cfg.jwks_file, **opts)
        self._remembered: dict[str, tuple[float, Principal]] = {}

    def cached(self, token: str) -> Optional[Principal]:
        """The Principal of a token verified before and still valid, else None."""
        hit = self._remembered.get(token)
        return hit[1] if hit is not None and hit[0] > time.time() else None

    async def verify(self, token: str) -> Principal:
        now = time.time()
        try:
            header = jwt.get_unverified_header(token)
            key = await self._key_for(header)
            claims = jwt.decode(token, key, algorithms=self.algorithms, audience=self.cfg.audience,
                                issuer=self.cfg.issuer, leeway=self.cfg.leeway_s,
                                options={"require": list(self.cfg.require)})
            principal = self._principal(claims)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            logger.info("JWT refused (%s)", type(exc).__name__)   # never the token
            raise AuthenticationError(INCORRECT) from None
        self._remember(token, principal, claims, now)
        return principal

    async def _key_for(self, header: dict) -> Any:
        """HS* tokens are checked with the shared secret only; any other algorithm with the public key
        or JWKS only, so an HS token "signed" with the public key is never checked against it."""
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise jwt.InvalidAlgorithmError("algorithm not allowed")
        if alg.startswith("HS"):
            return self._secret
        if self._public_key is not None:
            return self._public_key
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise jwt.InvalidTokenError("no kid")
        # PyJWKClient caches the key set; a fetch (first use, expiry, unknown kid) blocks, so off the loop.
        return await asyncio.to_thread(self._jwks.get_signing_key, kid)

    def _principal(self, claims: dict) -> Principal:
        subject = claims.get(self.cfg.subject_claim)
        if not isinstance(subject, str) or not subject or len(subject) > 256:
            raise ValueError("bad subject")
        models = claims.get(self.cfg.models_claim)
        if models is None:
            models = self.default_models
        elif isinstance(models, str):
            models = tuple(models.split())
        elif isinstance(models, list) and all(isinstance(m, str) for m in models):
            models = tuple(models)
        else:
            raise ValueError("bad models claim")
        limits = None
        if self.cfg.limits_claim and claims.get(self.cfg.limits_claim) is not None:
            limits = RateLimits.model_validate(claims[self.cfg.limits_claim])
        return Principal(subject, models, limits)

    def _remember(self, token: str, principal: Principal, claims: dict, now: float) -> None:
        if len(self._remembered) >= self.max_remembered:
            self._remembered.clear()
        until = now + self.remember_s
        if "exp" in claims:
            until = min(until, float(claims["exp"]) + self.cfg.leeway_s)
        self._remembered[token] = (until, principal)


class FileJWKClient(jwt.PyJWKClient):
    """PyJWKClient (caching, refetch on an unknown kid) over a local JWKS file: PyJWT fetches http(s) only."""

    def __init__(self, path: str, **opts: Any):
        super().__init__("https://jwks-file.invalid/", **opts)
        self.path = pathlib.Path(path)

    def fetch_data(self) -> Any:
        data = json.loads(self.path.read_text())
        self._last_successful_fetch = time.monotonic()   # starts PyJWKClient's refetch cooldown
        return data


class Authenticator:
    """Bearer credential -> Principal. With nothing configured it is off: everyone is ANONYMOUS."""

    def __init__(self, cfg: AuthConfig):
        self.cfg = cfg
        self.keys = StaticKeys(cfg)
        self.jwt = JwtVerifier(cfg.jwt, tuple(cfg.default_models)) if cfg.jwt else None
        self.enabled = cfg.enabled
        self.default_limits = cfg.limits

    def describe(self) -> str:
        if not self.enabled:
            return ("AUTH IS OFF: no API keys or JWT configured (ingress.auth); every request is served, "
                    "unauthenticated and unlimited, as subject 'anonymous'.")
        parts = [f"{len(self.keys)} static key(s)"] if len(self.keys) else []
        if self.jwt:
            parts.append("JWT (" + ", ".join(self.jwt.algorithms) + ")")
        return "auth is on: " + " and ".join(parts)

    async def authenticate(self, authorization: str) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            err = AuthenticationError(MISSING)
            err.code = None   # as OpenAI: a missing key has no code (the constructor keeps the class's for None)
            raise err
        if self.jwt is not None:
            principal = self.jwt.cached(credential)
            if principal is not None:
                return principal
        principal = self.keys.lookup(credential)
        if principal is not None:
            return principal
        if self.jwt is not None and credential.count(".") == 2:
            return await self.jwt.verify(credential)
        raise AuthenticationError(INCORRECT)

    def limits_of(self, principal: Principal) -> RateLimits:
        return principal.limits if principal.limits is not None else self.default_limits


class Guard:
    """ASGI middleware: every path but the public ones needs a credential; the request is then
    admitted against its subject's limits (429 otherwise), carries `state.principal` and
    `state.ticket`, and its response gets the x-ratelimit-* headers. Errors raised here are
    rendered by the request-id middleware outside it."""

    def __init__(self, app, authenticator: Authenticator, limiter):
        self.app = app
        self.auth = authenticator
        self.limiter = limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or is_public(scope):
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        principal = await self.auth.authenticate(header)
        ticket = await self.limiter.admit(principal.subject, self.auth.limits_of(principal))
        state = scope.setdefault("state", {})
        state["principal"], state["ticket"] = principal, ticket
        status = 500

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = ticket.headers()
                if extra:   # a 429 raised by the route carries its own, fresher values
                    headers = list(message.get("headers", ()))
                    present = {k.lower() for k, _ in headers}
                    message = {**message, "headers": headers + [h for h in extra if h[0] not in present]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            ticket.close(failed=status >= 400)
