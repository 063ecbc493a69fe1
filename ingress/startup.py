"""The line a person waits for: once every model has answered its first call, the ingress logs one
line listing each model, its kind and the URL it is served at. No torch here.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from deployments.types import ModelCard

logger = logging.getLogger("ray.serve.modelhub.ingress")   # under ray.serve: see deployments/loading.py
ENDPOINTS = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings", "image": "/v1/images/generations",
             "rerank": "/v1/rerank"}


def ready_line(cards: list[ModelCard], base_url: str) -> str:
    models = "; ".join(f"{c.id} ({c.kind}) {base_url}{ENDPOINTS[c.kind]}" for c in cards)
    return f"ModelHub Serve is ready with {len(cards)} model{'s' if len(cards) != 1 else ''}: {models}"


async def announce_when_ready(registry: Any, public_url: Optional[str]) -> None:
    """Waits for every model's card (a call each model's replica answers once loaded), then logs."""
    try:
        cards = await registry.cards()
    except Exception as exc:  # a model that failed to load has logged why; say what the app lacks
        logger.error("ModelHub Serve is not ready: a model did not answer (%s: %s)", type(exc).__name__, exc)
        return
    logger.info("%s", ready_line(cards, public_url or await serve_base_url()))


async def serve_base_url() -> str:
    """Where Serve listens: the ingress replica's own port under direct ingress, else the proxy's."""
    try:
        from ray.serve.context import _get_global_client
        http = await _get_global_client()._controller.get_http_config.remote()
        host, port = http.host, http.port
    except Exception:  # outside a Serve cluster (tests) or a Ray without this call
        return "http://<serve-host>:<port>"
    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":
        port = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", port))
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{port}"
