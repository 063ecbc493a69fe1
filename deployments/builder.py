"""Turns a model config into a bound Serve deployment (options computed from config, then
serve.deployment(cls, **opts).bind(cfg)). Nothing is decided by decorators at import time.
Imports only torch-free deployment shims, so the ingress builder can use it.
"""
from __future__ import annotations

import re
from typing import Any

from ray import serve

from deployments.config import IngressConfig, ModelConfig
from deployments.embeddings.server import EmbeddingServer
from deployments.images.server import ImageServer
from deployments.images.store import ImageStore
from deployments.llm.server import LLMServer
from deployments.rerank.server import RerankServer

_SERVERS = {"chat": LLMServer, "embedding": EmbeddingServer, "image": ImageServer, "rerank": RerankServer}


def deployment_name(model_id: str, kind: str) -> str:
    return f"{kind}:{re.sub(r'[^A-Za-z0-9_.-]+', '--', model_id)}"


def model_deployment(cfg: ModelConfig) -> Any:
    cls = _SERVERS[cfg.kind]
    opts = cfg.deployment.serve_options(cls.default_options(cfg))
    if cfg.kind == "chat" and cfg.engine.tensor_parallel_size > 1:
        opts.update(tp_placement(cfg.engine.tensor_parallel_size, opts["ray_actor_options"],
                                 cfg.engine.tensor_parallel_placement))
    return serve.deployment(cls, name=deployment_name(cfg.id, cfg.kind), **opts).bind(cfg)


def image_store_deployment(ingress: IngressConfig) -> Any:
    return serve.deployment(ImageStore, name="ImageStore", **ImageStore.default_options()).bind(
        ingress.image_url_ttl_s, ingress.image_store_bytes, ingress.image_quota_bytes)


def tp_placement(world: int, actor: dict[str, Any], strategy: str = "STRICT_PACK") -> dict[str, Any]:
    """One bundle per rank, each the replica's own resources (rank 0 runs in bundle 0; custom
    resources pin every rank to nodes that have them), placed by `strategy`."""
    bundle = {"CPU": actor.get("num_cpus", 1), **actor.get("resources", {})}
    if actor.get("num_gpus"):
        bundle["GPU"] = actor["num_gpus"]
    if actor.get("memory"):
        bundle["memory"] = actor["memory"]
    return {"placement_group_bundles": [dict(bundle) for _ in range(world)],
            "placement_group_strategy": strategy}
