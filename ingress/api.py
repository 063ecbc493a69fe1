"""create_api(): the FastAPI app, independent of Ray so tests can drive it in-process.

Request ids, the body-size limit and the access log live in one ASGI middleware (middleware.py);
inside it, ingress.auth.Guard authenticates every path but /health, /ready and signed image URLs,
and admits the request against its subject's rate limits. Prompts are logged only when the config
asks for it.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from deployments.config import AuthConfig, ClientLimits, RequestLimits
from ingress.auth import Authenticator, Guard, read_secret
from ingress.backends import ModelRegistry
from ingress.client_limit import ClientThrottle
from ingress.errors import install_error_handlers
from ingress.image_urls import ImageUrlSigner
from ingress.middleware import RequestContextMiddleware
from ingress.ratelimit import RateLimiter
from ingress.usage import UsageMeter
from ingress.routes import chat, completions, embeddings, images, models, rerank, tokenize, version

Readiness = Callable[[], Awaitable[dict[str, dict[str, Any]]]]

logger = logging.getLogger("ray.serve.modelhub.ingress")   # under ray.serve: Serve configures its handlers in replicas


def create_api(registry: ModelRegistry, *, image_store: Any = None, auth: Optional[AuthConfig] = None,
               limit_store: Any = None, meter: Optional[UsageMeter] = None, log_prompts: bool = False,
               public_url: Optional[str] = None, limits: Optional[RequestLimits] = None,
               readiness: Optional[Readiness] = None, echo_request_id: bool = True,
               client_limits: Optional[ClientLimits] = None) -> FastAPI:
    """`readiness()` returns {model id: {"healthy": bool, ...detail}} for /ready (app.py asks Serve);
    `limit_store`: a LimitStore handle (None: no rate limits); `meter`: usage counters (default Ray's)."""
    auth = auth or AuthConfig()
    app = FastAPI(title="ModelHub Serve", version=version.server_version(), docs_url="/docs", redoc_url=None)
    limits = limits or RequestLimits()
    app.state.registry = registry
    app.state.image_store = image_store
    app.state.url_signer = ImageUrlSigner(read_secret(auth.image_url_secret_env, auth.image_url_secret_file,
                                                      "auth.image_url_secret"), image_store)
    app.state.public_url = public_url.rstrip("/") if public_url else None
    app.state.limits = limits
    app.state.log_prompt = _prompt_logger(log_prompts)
    for module in (models, chat, completions, embeddings, images, rerank, tokenize, version):
        app.include_router(module.router)
    app.include_router(images.files_router)

    @app.get("/health")
    async def health():
        """Liveness: the ingress answers. It calls no model."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: every model deployment runs and is healthy, per model (from Serve's status, cached)."""
        detail = await readiness() if readiness is not None else {}
        ok = all(d.get("healthy") for d in detail.values())
        return JSONResponse({"status": "ready" if ok else "not_ready", "models": detail},
                            status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "5"})

    install_error_handlers(app)
    app.add_middleware(Guard, **_guard_parts(auth, limit_store, meter))
    # outermost: request ids, per-client limits, the body limit, the access log; it renders the
    # Guard's 401s and 429s too
    throttle = ClientThrottle(client_limits) if client_limits is not None and client_limits.enabled else None
    app.add_middleware(RequestContextMiddleware, max_body_bytes=limits.max_body_bytes,
                       echo_request_id=echo_request_id, throttle=throttle)
    return app


def _guard_parts(auth: AuthConfig, limit_store: Any, meter: Optional[UsageMeter]) -> dict[str, Any]:
    """The Guard's authenticator and rate limiter; says at startup whether auth is on."""
    authenticator = Authenticator(auth)
    (logger.info if authenticator.enabled else logger.warning)(authenticator.describe())
    limiter = RateLimiter(limit_store, failure=auth.rate_limit_failure, lease_fraction=auth.rate_limit_lease_fraction,
                          sync_s=auth.rate_limit_sync_s, meter=meter or UsageMeter(),
                          default_completion_tokens=auth.default_reserved_completion_tokens)
    return {"authenticator": authenticator, "limiter": limiter}


def _prompt_logger(log_prompts: bool):
    """Logs a request's prompt only when the config asks for it (the access log never holds one)."""
    def log(request: Request, prompt: Any) -> None:
        if log_prompts:
            logger.info("request %s prompt=%r", request.state.request_id, prompt)
    return log
