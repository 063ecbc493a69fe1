"""Turns a model config into a bound Serve deployment (options computed from config, then
serve.deployment(cls, **opts).bind(cfg)). Nothing is decided by decorators at import time.
Imports only torch-free deployment shims, so the ingress builder can use it.
"""
from __future__ import annotations

import re
from typing import Any

from ray import serve

from deployments.config import ChatModelConfig, EmbeddingModelConfig, ImageModelConfig
from deployments.embeddings.server import EmbeddingServer
from deployments.images.server import ImageServer
from deployments.images.store import ImageStore
from deployments.llm.server import LLMServer

_SERVERS = {"chat": LLMServer, "embedding": EmbeddingServer, "image": ImageServer}


def deployment_name(model_id: str, kind: str) -> str:
    return f"{kind}:{re.sub(r'[^A-Za-z0-9_.-]+', '--', model_id)}"


def model_deployment(cfg: ChatModelConfig | EmbeddingModelConfig | ImageModelConfig) -> Any:
    cls = _SERVERS[cfg.kind]
    opts = cfg.deployment.serve_options(cls.default_options(cfg))
    return serve.deployment(cls, name=deployment_name(cfg.id, cfg.kind), **opts).bind(cfg)


def image_store_deployment(ttl_s: int) -> Any:
    return serve.deployment(ImageStore, name="ImageStore", **ImageStore.default_options()).bind(ttl_s)
