"""The ingress deployment and build_app(args): the typed application builder serve_config.yaml
points at (`import_path: ingress.app:build_app`).

One Serve deployment per configured model, each scaled on its own, plus a small image store when
an image model is configured; the ingress routes by `model` through DeploymentHandles. Never
imports torch.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from ray import serve

from deployments.builder import deployment_name, image_store_deployment, model_deployment
from deployments.config import AppConfig, parse_app_config
from ingress.api import create_api
from ingress.backends import HandleClient, ModelEntry, ModelRegistry
from ingress.coalesce import EmbeddingCoalescer
from ingress.coldstart import ColdStartGuard
from ingress.limit_store import LimitStore
from ingress.readiness import ServeReadiness
from ingress.startup import announce_when_ready

INGRESS_DEFAULTS: dict[str, Any] = {
    "num_replicas": 1, "max_ongoing_requests": 1024, "max_queued_requests": 4096,
    "ray_actor_options": {"num_cpus": 0.1},
}


class IngressServer:
    def __init__(self, config: dict[str, Any], handles: dict[str, Any], image_store: Any, limit_store: Any = None):
        cfg = AppConfig.model_validate(config)
        readiness = ServeReadiness({m.id: deployment_name(m.id, m.kind) for m in cfg.models})
        registry = ModelRegistry({m.id: ModelEntry(m, self._client(m, handles[m.id], cfg, readiness))
                                  for m in cfg.models}, replicas=readiness)
        self._api = create_api(registry, image_store=image_store, auth=cfg.ingress.auth, limit_store=limit_store,
                               log_prompts=cfg.ingress.log_prompts, public_url=cfg.ingress.public_url,
                               limits=cfg.ingress.limits, readiness=readiness,
                               echo_request_id=False)   # Serve's own middleware echoes x-request-id
        self._announce: Optional[asyncio.Task] = None

        async def announce() -> None:   # Serve runs the app's startup hooks once the replica's loop runs
            self._announce = asyncio.create_task(
                announce_when_ready(registry, readiness, cfg.ingress.public_url))
        self._api.router.on_startup.append(announce)

    @staticmethod
    def _client(model: Any, handle: Any, cfg: AppConfig, readiness: ServeReadiness) -> Any:
        client: Any = HandleClient(handle)
        if model.min_replicas == 0:
            client = ColdStartGuard(client, model.id, readiness.running_replicas(model.id), model.cold_start_timeout_s)
        if model.kind == "embedding" and cfg.ingress.coalesce_embeddings:
            return EmbeddingCoalescer(client, cfg.ingress.coalesce_max_batch,
                                      cfg.ingress.coalesce_max_in_flight, cfg.ingress.coalesce_max_pending)
        return client

    def __serve_build_asgi_app__(self):
        return self._api


def build_app(args: dict[str, Any]) -> Any:
    """Validates `args` (unknown keys fail here, naming the key) and binds the application."""
    cfg = parse_app_config(args)
    handles = {m.id: model_deployment(m) for m in cfg.models}
    has_images = any(m.kind == "image" for m in cfg.models)   # no image model, no store replica
    store = image_store_deployment(cfg.ingress) if has_images else None
    limits = None   # the shared rate-limit buckets, only where some subject can have a limit
    if cfg.ingress.auth.enabled and cfg.ingress.auth.limited():
        limits = serve.deployment(LimitStore, name="LimitStore", **LimitStore.default_options()).bind()
    opts = cfg.ingress.deployment.serve_options(INGRESS_DEFAULTS)
    ingress = serve.deployment(serve.ingress()(IngressServer), name="Ingress", **opts)
    return ingress.bind(cfg.model_dump(mode="json"), handles, store, limits)
