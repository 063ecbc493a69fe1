"""The model registry: model id -> config and a client that calls the model's deployment.

`HandleClient` wraps a Ray Serve DeploymentHandle; tests pass fakes with the same methods, so
the whole HTTP layer runs without Ray. A caller that goes away cancels the downstream call.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Protocol

from deployments.config import ModelConfig
from deployments.errors import InvalidRequestError, ModelNotFoundError
from deployments.types import (EmbedRequest, EmbedResult, GenerateChunk, GenerateRequest, GenerateResult,
                               ImageRequest, ImageResult, ModelCard)

logger = logging.getLogger(__name__)


class ModelClient(Protocol):
    async def card(self) -> ModelCard: ...
    async def generate(self, req: GenerateRequest) -> GenerateResult: ...
    def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...
    async def embed(self, req: EmbedRequest) -> EmbedResult: ...
    async def images(self, req: ImageRequest) -> ImageResult: ...


class HandleClient:
    def __init__(self, handle: Any):
        self.handle = handle
        self._streaming = handle.options(stream=True)

    async def card(self) -> ModelCard:
        return await _call(self.handle.card.remote())

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        return await _call(self.handle.generate.remote(req))

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        gen = self._streaming.generate_stream.remote(req)
        done = False
        try:
            async for chunk in gen:
                yield chunk
            done = True
        finally:
            if not done:
                gen.cancel()

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return await _call(self.handle.embed.remote(req))

    async def embed_many(self, reqs: list[EmbedRequest]) -> list:
        return await _call(self.handle.embed_many.remote(reqs))

    async def images(self, req: ImageRequest) -> ImageResult:
        return await _call(self.handle.generate.remote(req))


def model_client(model_id: str, kind: str, app_name: str = "modelhub") -> HandleClient:
    """Typed access to one model for any Ray job on the cluster (after `ray.init(address=...)`): the
    same deployments.types requests and results the ingress sends, no HTTP. docs/operations.md."""
    from ray import serve

    from deployments.builder import deployment_name
    return HandleClient(serve.get_deployment_handle(deployment_name(model_id, kind), app_name=app_name))


async def _call(response: Any) -> Any:
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


@dataclass
class ModelEntry:
    cfg: ModelConfig
    client: Any


def _needs_details(cfg: ModelConfig) -> bool:
    """Whether the card lacks what only the loaded model knows."""
    return cfg.kind == "embedding" or (cfg.kind == "chat" and cfg.engine.max_model_len is None)


_KIND_ENDPOINT = {"chat": "chat and completions", "embedding": "embeddings", "image": "image generation"}


class ModelRegistry:
    """The configured models. /v1/models lists them from their configs; what only a loaded model knows
    (context length, embedding dimensions) is asked once of a running replica and cached, never of a
    model without one, so listing models never wakes a model at zero nor waits for one loading."""

    def __init__(self, entries: dict[str, ModelEntry], *, replicas: Optional[Callable[[], Awaitable[dict]]] = None,
                 details_timeout_s: float = 30.0):
        """`replicas()`: {model id: {"running_replicas": n, ...}} from Serve (readiness.py); None: every
        model counts as running (tests without Ray)."""
        self.entries = entries
        self.replicas = replicas
        self.details_timeout_s = details_timeout_s
        self.created = int(time.time())
        self._details: dict[str, ModelCard] = {}

    def get(self, model_id: Optional[str], kind: str) -> ModelEntry:
        if model_id is None:   # images may omit `model`: take the first image model
            model_id = next((k for k, e in self.entries.items() if e.cfg.kind == kind), None)
            if model_id is None:
                raise ModelNotFoundError(f"No {kind} model is configured.", param="model")
        entry = self.entries.get(model_id)
        if entry is None:
            raise ModelNotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.")
        if entry.cfg.kind != kind:
            raise InvalidRequestError(
                f"The model `{model_id}` is a {entry.cfg.kind} model and serves {_KIND_ENDPOINT[entry.cfg.kind]} "
                f"only, not this endpoint.", param="model", code="model_not_supported")
        return entry

    async def cards(self) -> list[ModelCard]:
        missing = [e for model_id, e in self.entries.items() if model_id not in self._details and _needs_details(e.cfg)]
        if missing:
            await asyncio.gather(*(self._fetch_details(e) for e in await self._running(missing)))
        return [self._card(model_id, e) for model_id, e in self.entries.items()]

    def _card(self, model_id: str, entry: ModelEntry) -> ModelCard:
        card = entry.cfg.card(self.created)
        details = self._details.get(model_id)
        if details is None:
            return card
        return replace(card, context_length=details.context_length, embedding_dimensions=details.embedding_dimensions)

    async def _running(self, entries: list[ModelEntry]) -> list[ModelEntry]:
        """The entries Serve reports with a running replica: asking them wakes nothing, and a model
        still loading is not waited for."""
        counts = await self.replicas() if self.replicas is not None else {}
        return [e for e in entries if counts.get(e.cfg.id, {}).get("running_replicas", 1) > 0]

    async def _fetch_details(self, entry: ModelEntry) -> None:
        """A model still loading (or lost) leaves its card as the config has it; the next listing asks again."""
        try:
            self._details[entry.cfg.id] = await asyncio.wait_for(entry.client.card(), self.details_timeout_s)
        except Exception:   # noqa: BLE001 - the listing stands on the config; the model's own errors show on use
            logger.warning("model %s did not give its details; listing it from its config", entry.cfg.id, exc_info=True)

    async def card(self, model_id: str) -> ModelCard:
        for c in await self.cards():
            if c.id == model_id:
                return c
        raise ModelNotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.")
