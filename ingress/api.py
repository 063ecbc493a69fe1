"""create_api(): the FastAPI app, independent of Ray so tests can drive it in-process.

Request ids are assigned by a tiny ASGI middleware (also used by the error renderer); inside it,
ingress.auth.Guard authenticates every path but /health, /ready and signed image URLs, and admits
the request against its subject's rate limits. Prompts are logged only when the config asks for it.
"""
from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request

from deployments.config import AuthConfig
from ingress.auth import Authenticator, Guard, read_secret
from ingress.backends import ModelRegistry
from ingress.errors import error_response, install_error_handlers, to_modelhub_error
from ingress.image_urls import ImageUrlSigner
from ingress.ratelimit import RateLimiter
from ingress.usage import UsageMeter
from ingress.routes import chat, completions, embeddings, images, models

logger = logging.getLogger("modelhub.ingress")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class RequestIdMiddleware:
    """Takes a sane client `x-request-id` or makes one (request.state.request_id), and turns an
    unexpected exception into a 500 carrying that id (logged once, never re-raised to the server)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _SAFE_ID.match(given) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                logger.error("request %s failed after its response started", rid, exc_info=exc)
                return
            await error_response(to_modelhub_error(exc, rid), rid)(scope, receive, send)


def create_api(registry: ModelRegistry, *, image_store: Any = None, auth: Optional[AuthConfig] = None,
               limit_store: Any = None, meter: Optional[UsageMeter] = None, log_prompts: bool = False,
               public_url: Optional[str] = None) -> FastAPI:
    """`limit_store`: a LimitStore handle (None: no rate limits); `meter`: usage counters (default Ray's)."""
    auth = auth or AuthConfig()
    app = FastAPI(title="ModelHub Serve", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.registry = registry
    app.state.image_store = image_store
    app.state.url_signer = ImageUrlSigner(read_secret(auth.image_url_secret_env, auth.image_url_secret_file,
                                                      "auth.image_url_secret"), image_store)
    app.state.public_url = public_url.rstrip("/") if public_url else None
    app.state.log_request = _request_logger(log_prompts)
    authenticator = Authenticator(auth)
    (logger.info if authenticator.enabled else logger.warning)(authenticator.describe())
    limiter = RateLimiter(limit_store, failure=auth.rate_limit_failure, lease_fraction=auth.rate_limit_lease_fraction,
                          sync_s=auth.rate_limit_sync_s, meter=meter or UsageMeter(),
                          default_completion_tokens=auth.default_reserved_completion_tokens)
    for module in (models, chat, completions, embeddings, images):
        app.include_router(module.router)
    app.include_router(images.files_router)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    install_error_handlers(app)
    app.add_middleware(Guard, authenticator=authenticator, limiter=limiter)
    app.add_middleware(RequestIdMiddleware)   # outermost: it renders the Guard's 401s and 429s too
    return app


def _request_logger(log_prompts: bool):
    def log(request: Request, model: str, user: Optional[str], prompt: Any) -> None:
        rid = request.state.request_id
        if log_prompts:
            logger.info("request %s model=%s user=%s prompt=%r", rid, model, user, prompt)
        else:
            logger.info("request %s model=%s user=%s", rid, model, user)
    return log
