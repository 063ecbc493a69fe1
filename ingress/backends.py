"""The model registry: model id -> config and a client that calls the model's deployment.

`HandleClient` wraps a Ray Serve DeploymentHandle; tests pass fakes with the same methods, so
the whole HTTP layer runs without Ray. A caller that goes away cancels the downstream call; Ray's
busy, starting and lost-replica errors become typed errors (503 with Retry-After).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol

from deployments.config import ModelConfig
from deployments.errors import InvalidRequestError, ModelNotFoundError
from ingress.errors import transport_error
from deployments.types import (EmbedRequest, EmbedResult, GenerateChunk, GenerateRequest, GenerateResult,
                               ImageRequest, ImageResult, ModelCard)
from ingress.auth import Principal


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
        except Exception as exc:
            raise transport_error(exc) or exc
        finally:
            if not done:
                gen.cancel()

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return await _call(self.handle.embed.remote(req))

    async def embed_many(self, reqs: list[EmbedRequest]) -> list:
        return await _call(self.handle.embed_many.remote(reqs))

    async def images(self, req: ImageRequest) -> ImageResult:
        return await _call(self.handle.generate.remote(req))


async def _call(response: Any) -> Any:
    """Awaits a handle call; Ray's busy/unavailable/lost errors become typed errors here, so no
    handler Serve installs on the app renders them as plain text."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
    except Exception as exc:
        raise transport_error(exc) or exc


@dataclass
class ModelEntry:
    cfg: ModelConfig
    client: Any


_KIND_ENDPOINT = {"chat": "chat and completions", "embedding": "embeddings", "image": "image generation"}


class ModelRegistry:
    def __init__(self, entries: dict[str, ModelEntry]):
        self.entries = entries
        self._cards: Optional[list[ModelCard]] = None

    def get(self, model_id: Optional[str], kind: str, principal: Principal) -> ModelEntry:
        """The model `principal` may use; a model out of its scope answers exactly as an absent one."""
        if model_id is None:   # images may omit `model`: take the first image model
            model_id = next((k for k, e in self.entries.items() if e.cfg.kind == kind and principal.allows(k)), None)
            if model_id is None:
                raise ModelNotFoundError(f"No {kind} model is configured.", param="model")
        entry = self.entries.get(model_id)
        if entry is None or not principal.allows(model_id):
            raise ModelNotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.")
        if entry.cfg.kind != kind:
            raise InvalidRequestError(
                f"The model `{model_id}` is a {entry.cfg.kind} model and serves {_KIND_ENDPOINT[entry.cfg.kind]} "
                f"only, not this endpoint.", param="model", code="model_not_supported")
        return entry

    async def cards(self, principal: Principal) -> list[ModelCard]:
        """The cards of the models `principal` may use."""
        if self._cards is None:
            cards = await asyncio.gather(*(e.client.card() for e in self.entries.values()))
            self._cards = list(cards)
        if principal.models == ("*",):
            return self._cards
        return [c for c in self._cards if principal.allows(c.id)]

    async def card(self, model_id: str, principal: Principal) -> ModelCard:
        for c in await self.cards(principal):
            if c.id == model_id:
                return c
        raise ModelNotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.")
