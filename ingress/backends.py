"""The model registry: model id -> config and a client that calls the model's deployment.

`HandleClient` wraps a Ray Serve DeploymentHandle; tests pass fakes with the same methods, so
the whole HTTP layer runs without Ray. A caller that goes away cancels the downstream call; Ray's
busy, starting and lost-replica errors become typed errors (503 with Retry-After).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Protocol, Union

from deployments.config import ModelConfig
from deployments.errors import InvalidRequestError, ModelNotFoundError
from ingress.errors import transport_error
from deployments.types import (EmbedRequest, EmbedResult, GenerateChunk, GenerateRequest, GenerateResult,
                               ImageRequest, ImageResult, ModelCard, ScoreRequest, ScoreResult, TokenizeRequest,
                               TokenizeResult)
from ingress.auth import Principal

logger = logging.getLogger(__name__)


class ModelClient(Protocol):
    async def card(self) -> ModelCard: ...
    async def generate(self, req: GenerateRequest) -> GenerateResult: ...
    def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...
    async def embed(self, req: EmbedRequest) -> EmbedResult: ...
    async def images(self, req: ImageRequest) -> ImageResult: ...
    async def score(self, req: ScoreRequest) -> ScoreResult: ...
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult: ...
    async def detokenize(self, tokens: list[int]) -> str: ...


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
                _cancel(gen)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return await _call(self.handle.embed.remote(req))

    async def embed_many(self, reqs: list[EmbedRequest]) -> list:
        return await _call(self.handle.embed_many.remote(reqs))

    async def images(self, req: ImageRequest) -> ImageResult:
        return await _call(self.handle.generate.remote(req))

    async def score(self, req: ScoreRequest) -> ScoreResult:
        return await _call(self.handle.score.remote(req))

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        return await _call(self.handle.tokenize.remote(req))

    async def detokenize(self, tokens: list[int]) -> str:
        return await _call(self.handle.detokenize.remote(tokens))


def model_client(model_id: str, kind: str, app_name: str = "modelhub") -> HandleClient:
    """Typed access to one model for any Ray job on the cluster (after `ray.init(address=...)`): the
    same deployments.types requests and results the ingress sends, no HTTP. `app_name`: the application
    that deploys the model: the hub's, or for a model the hub routes to, its entry's `application`.
    docs/operations.md."""
    from ray import serve

    from deployments.builder import deployment_name
    return HandleClient(serve.get_deployment_handle(deployment_name(model_id, kind), app_name=app_name))


async def _call(response: Any) -> Any:
    """Awaits a handle call; Ray's busy/unavailable/lost errors become typed errors here, so no
    handler Serve installs on the app renders them as plain text."""
    try:
        return await response
    except asyncio.CancelledError:
        _cancel(response)
        raise
    except Exception as exc:
        raise transport_error(exc) or exc


def _cancel(response: Any) -> None:
    """Cancels a handle call, best effort. Ray's `cancel()` re-raises what the call's replica assignment
    raised (BackPressureError when the queue was full): raised from a `finally`, that would replace the
    typed error already on its way to the client and reach Serve's plain-text handler."""
    try:
        response.cancel()
    except Exception:
        pass


@dataclass
class ModelEntry:
    cfg: ModelConfig
    client: Any


def _needs_details(cfg: ModelConfig) -> bool:
    """Whether the card lacks what only the loaded model knows."""
    return cfg.kind in ("embedding", "rerank") or (cfg.kind == "chat" and cfg.engine.max_model_len is None)


_KIND_ENDPOINT = {"chat": "chat, completions and tokenize", "embedding": "embeddings, rerank and score",
                  "image": "image generation", "rerank": "rerank and score"}


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

    def get(self, model_id: Optional[str], kind: Union[str, tuple[str, ...]], principal: Principal) -> ModelEntry:
        """The entry serving `model_id` for an endpoint that takes models of `kind` (one kind, or
        several in order of preference), among those `principal` may use: a model out of its scope
        answers exactly as an absent one. Endpoints whose `model` is optional pass None: the first
        allowed model of the first kind that has one answers."""
        kinds = (kind,) if isinstance(kind, str) else kind
        if model_id is None:
            model_id = next((k for want in kinds for k, e in self.entries.items()
                             if e.cfg.kind == want and principal.allows(k)), None)
            if model_id is None:
                raise ModelNotFoundError(f"No {' or '.join(kinds)} model is configured.", param="model")
        entry = self.entries.get(model_id)
        if entry is None or not principal.allows(model_id):
            raise ModelNotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.")
        if entry.cfg.kind not in kinds:
            raise InvalidRequestError(
                f"The model `{model_id}` is a {entry.cfg.kind} model and serves {_KIND_ENDPOINT[entry.cfg.kind]} "
                f"only, not this endpoint.", param="model", code="model_not_supported")
        return entry

    async def cards(self, principal: Principal) -> list[ModelCard]:
        """The cards of the models `principal` may use."""
        allowed = {k: e for k, e in self.entries.items() if principal.allows(k)}
        missing = [e for model_id, e in allowed.items() if model_id not in self._details and _needs_details(e.cfg)]
        if missing:
            await asyncio.gather(*(self._fetch_details(e) for e in await self._running(missing)))
        return [self._card(model_id, e) for model_id, e in allowed.items()]

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

    async def card(self, model_id: str, principal: Principal) -> ModelCard:
        for c in await self.cards(principal):
            if c.id == model_id:
                return c
        raise ModelNotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.")
