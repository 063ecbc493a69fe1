"""The line a person waits for: once every model deployment is healthy, the ingress logs one line
listing each model, its kind and the URL it is served at. No torch here.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Optional

from deployments.types import ModelCard
from ingress.auth import ANONYMOUS

logger = logging.getLogger("ray.serve.modelhub.ingress")   # under ray.serve: see deployments/loading.py
ENDPOINTS = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings", "image": "/v1/images/generations",
             "rerank": "/v1/rerank"}


def ready_line(cards: list[ModelCard], base_url: str) -> str:
    models = "; ".join(f"{c.id} ({c.kind}) {base_url}{ENDPOINTS[c.kind]}" for c in cards)
    return f"ModelHub Serve is ready with {len(cards)} model{'s' if len(cards) != 1 else ''}: {models}"


_FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}


async def announce_when_ready(registry: Any, readiness: Any, public_url: Optional[str],
                              poll_s: float = 1.0) -> None:
    """Waits until every model deployment is healthy (readiness.py: Serve's view, which a model at
    zero replicas also passes), then logs the ready line; a model that failed gets one error line."""
    while True:
        try:
            detail = await readiness()
        except Exception as exc:  # noqa: BLE001 - the controller may be briefly unreachable at start
            detail = {"?": {"healthy": False, "status": type(exc).__name__}}
        failed = sorted(m for m, d in detail.items() if d.get("status") in _FAILED)
        if failed:   # the model's own replica has logged why, in one line at the top
            logger.error("ModelHub Serve is not ready: %s failed to start (%s)", ", ".join(failed),
                         "; ".join(str(detail[m].get("message", detail[m]["status"]))[:300] for m in failed))
            return
        if all(d.get("healthy") for d in detail.values()):
            break
        await asyncio.sleep(poll_s)
    cards = await registry.cards(ANONYMOUS)   # every model: the line is for the operator
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
