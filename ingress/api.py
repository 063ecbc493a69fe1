"""create_api(): the FastAPI app, independent of Ray so tests can drive it in-process.

Request ids, the body-size limit and the access log live in one ASGI middleware (middleware.py);
auth is a dependency on the /v1 routers. Prompts are logged only when the config asks for it.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from deployments.config import RequestLimits
from ingress.auth import ApiKeyAuth
from ingress.backends import ModelRegistry
from ingress.errors import install_error_handlers
from ingress.middleware import RequestContextMiddleware
from ingress.routes import chat, completions, embeddings, images, models, rerank, tokenize, version

Readiness = Callable[[], Awaitable[dict[str, dict[str, Any]]]]

logger = logging.getLogger("ray.serve.modelhub.ingress")   # under ray.serve: Serve configures its handlers in replicas


def create_api(registry: ModelRegistry, *, image_store: Any = None, api_keys_env: Optional[str] = None,
               log_prompts: bool = False, public_url: Optional[str] = None,
               limits: Optional[RequestLimits] = None, readiness: Optional[Readiness] = None,
               echo_request_id: bool = True) -> FastAPI:
    """`readiness()` returns {model id: {"healthy": bool, ...detail}} for /ready (app.py asks Serve)."""
    app = FastAPI(title="ModelHub Serve", version=version.server_version(), docs_url="/docs", redoc_url=None)
    limits = limits or RequestLimits()
    app.state.registry = registry
    app.state.image_store = image_store
    app.state.public_url = public_url.rstrip("/") if public_url else None
    app.state.limits = limits
    app.state.log_prompt = _prompt_logger(log_prompts)
    auth = ApiKeyAuth(api_keys_env)
    guarded = [Depends(auth)]
    for module in (models, chat, completions, embeddings, images, rerank, tokenize, version):
        app.include_router(module.router, dependencies=guarded)
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
    app.add_middleware(RequestContextMiddleware, max_body_bytes=limits.max_body_bytes,
                       echo_request_id=echo_request_id)
    return app


def _prompt_logger(log_prompts: bool):
    """Logs a request's prompt only when the config asks for it (the access log never holds one)."""
    def log(request: Request, prompt: Any) -> None:
        if log_prompts:
            logger.info("request %s prompt=%r", request.state.request_id, prompt)
    return log
