"""create_api(): the FastAPI app, independent of Ray so tests can drive it in-process.

Request ids are assigned by a tiny ASGI middleware (also used by the error renderer); auth is a
dependency on the /v1 routers. Prompts are logged only when the config asks for it.
"""
from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request

from ingress.auth import ApiKeyAuth
from ingress.backends import ModelRegistry
from ingress.errors import error_response, install_error_handlers, to_modelhub_error
from ingress.routes import chat, completions, embeddings, images, models, rerank, tokenize, version

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


def create_api(registry: ModelRegistry, *, image_store: Any = None, api_keys_env: Optional[str] = None,
               log_prompts: bool = False, public_url: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="ModelHub Serve", version=version.server_version(), docs_url="/docs", redoc_url=None)
    app.state.registry = registry
    app.state.image_store = image_store
    app.state.public_url = public_url.rstrip("/") if public_url else None
    app.state.log_request = _request_logger(log_prompts)
    auth = ApiKeyAuth(api_keys_env)
    guarded = [Depends(auth)]
    for module in (models, chat, completions, embeddings, images, rerank, tokenize, version):
        app.include_router(module.router, dependencies=guarded)
    app.include_router(images.files_router)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    return app


def _request_logger(log_prompts: bool):
    def log(request: Request, model: str, user: Optional[str], prompt: Any) -> None:
        rid = request.state.request_id
        if log_prompts:
            logger.info("request %s model=%s user=%s prompt=%r", rid, model, user, prompt)
        else:
            logger.info("request %s model=%s user=%s", rid, model, user)
    return log
