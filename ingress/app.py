"""The ingress deployment and the typed application builders serve_config.yaml points at:
build_app(args) (`ingress.app:build_app`), the hub, and build_model_app(args) (`ingress.app:build_model_app`),
one model in an application of its own that the hub routes to (a model entry's `application`).

The hub deploys one Serve deployment per configured model, each scaled on its own, plus a small image
store when an image model is configured; the ingress routes by `model` through DeploymentHandles, to
its own deployments or to those of the models' own applications. Never imports torch.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from ray import serve

from deployments.builder import deployment_name, image_store_deployment, model_deployment
from deployments.config import AppConfig, parse_app_config, parse_model_app_config
from ingress.api import create_api
from ingress.backends import HandleClient, ModelEntry, ModelRegistry
from ingress.client_limit import check_behind_haproxy
from ingress.coalesce import EmbeddingCoalescer
from ingress.coldstart import ColdStartGuard
from ingress.limit_store import LimitStore
from ingress.readiness import ServeReadiness
from ingress.startup import announce_when_ready

INGRESS_DEFAULTS: dict[str, Any] = {
    "num_replicas": 1, "max_ongoing_requests": 1024, "max_queued_requests": 4096,
    "ray_actor_options": {"num_cpus": 0.1},
}

# Serve's per-process switches (ray/serve/_private/constants.py) for ingress.single_event_loop. The
# ingress awaits everything and runs blocking calls in threads, so nothing stalls the replica's loop.
SINGLE_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def with_env(actor_options: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`actor_options` with `env` added to its runtime_env's env_vars; what the operator set wins."""
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    return {**actor_options, "runtime_env": runtime_env}


class IngressServer:
    def __init__(self, config: dict[str, Any], handles: dict[str, Any], image_store: Any, limit_store: Any = None):
        """`handles`: model id -> bound handle, for the models this application deploys; a model with an
        `application` gets a handle to that application's deployment here (routed_handle)."""
        cfg = AppConfig.model_validate(config)
        readiness = ServeReadiness({m.id: (m.application, deployment_name(m.id, m.kind)) for m in cfg.models})
        registry = ModelRegistry({m.id: ModelEntry(m, self._client(m, self._handle(m, handles), cfg, readiness))
                                  for m in cfg.models}, replicas=readiness)
        self._api = create_api(registry, image_store=image_store, auth=cfg.ingress.auth, limit_store=limit_store,
                               log_prompts=cfg.ingress.log_prompts, public_url=cfg.ingress.public_url,
                               limits=cfg.ingress.limits, readiness=readiness,
                               client_limits=cfg.ingress.client_limits,
                               echo_request_id=False)   # Serve's own middleware echoes x-request-id
        self._announce: Optional[asyncio.Task] = None

        async def announce() -> None:   # Serve runs the app's startup hooks once the replica's loop runs
            self._announce = asyncio.create_task(
                announce_when_ready(registry, readiness, cfg.ingress.public_url))
        self._api.router.on_startup.append(announce)

    @staticmethod
    def _handle(model: Any, handles: dict[str, Any]) -> Any:
        return handles[model.id] if model.application is None else routed_handle(model)

    @staticmethod
    def _client(model: Any, handle: Any, cfg: AppConfig, readiness: ServeReadiness) -> Any:
        client: Any = HandleClient(handle)
        if model.min_replicas == 0 or model.application is not None:   # another app's replicas may be at zero
            client = ColdStartGuard(client, model.id, readiness.running_replicas(model.id), model.cold_start_timeout_s)
        if model.kind == "embedding" and cfg.ingress.coalesce_embeddings:
            return EmbeddingCoalescer(client, cfg.ingress.coalesce_max_batch,
                                      cfg.ingress.coalesce_max_in_flight, cfg.ingress.coalesce_max_pending)
        return client

    def __serve_build_asgi_app__(self):
        return self._api


def routed_handle(model: Any) -> Any:
    """A handle to the deployment of a model that its own application deploys. Not checked against the
    controller: the applications of one `serve deploy` start together, so it may not exist yet (until it
    does, requests wait under the ColdStartGuard and /ready names it)."""
    return serve.get_deployment_handle(deployment_name(model.id, model.kind), app_name=model.application,
                                       _check_exists=False)


def build_app(args: dict[str, Any]) -> Any:
    """Validates `args` (unknown keys fail here, naming the key) and binds the hub: the ingress and
    every model that names no `application`."""
    cfg = parse_app_config(args)
    check_behind_haproxy(cfg.ingress.client_limits)   # again in the replica, whose environment decides
    handles = {m.id: model_deployment(m) for m in cfg.models if m.application is None}
    has_images = any(m.kind == "image" for m in cfg.models)   # no image model, no store replica
    store = image_store_deployment(cfg.ingress) if has_images else None
    limits = None   # the shared rate-limit buckets, only where some subject can have a limit
    if cfg.ingress.auth.enabled and cfg.ingress.auth.limited():
        limits = serve.deployment(LimitStore, name="LimitStore", **LimitStore.default_options()).bind()
    opts = cfg.ingress.deployment.serve_options(INGRESS_DEFAULTS)
    if cfg.ingress.single_event_loop:
        opts["ray_actor_options"] = with_env(opts["ray_actor_options"], SINGLE_LOOP_ENV)
    ingress = serve.deployment(serve.ingress()(IngressServer), name="Ingress", **opts)
    return ingress.bind(cfg.model_dump(mode="json"), handles, store, limits)


def build_model_app(args: dict[str, Any]) -> Any:
    """Validates `args` ({"model": {...}}, one model's whole config) and binds that model's deployment
    alone: no ingress and no HTTP route (deploy it with `route_prefix: null`). The hub reaches it through
    the entry whose `application` names this application."""
    return model_deployment(parse_model_app_config(args).model)
