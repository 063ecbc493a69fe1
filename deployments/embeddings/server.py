"""The embeddings Serve deployment: validate and tokenize per request, then @serve.batch gathers
the inputs of concurrent requests into one encode call on the model's thread.
No FastAPI here; torch loads inside __init__ only.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any, Callable, Optional, Union

from ray import serve

from deployments.config import EmbeddingModelConfig
from deployments.errors import InvalidRequestError, ModelHubError
from deployments.loading import loading
from deployments.threads import ModelThread
from deployments.types import EmbedRequest, EmbedResult, ModelCard


class EmbeddingServer:
    def __init__(self, model_cfg: EmbeddingModelConfig, *, encoder_factory: Optional[Callable] = None):
        from deployments.embeddings.encoder import Encoder
        self.cfg = model_cfg
        self._model_thread = ModelThread("encoder")   # loads and encodes: one OpenMP pool (threads.py)
        with loading(model_cfg):
            self.encoder = self._model_thread.run(encoder_factory or Encoder.load, model_cfg.source,
                                                  model_cfg.engine)
        # Batched per instance (a decorated method would share one queue among all instances).
        self._encode_batch = serve.batch(max_batch_size=model_cfg.engine.max_batch_size,
                                         batch_wait_timeout_s=model_cfg.engine.batch_wait_timeout_s)(self._encode)
        self.created = int(time.time())

    @staticmethod
    def default_options(cfg: EmbeddingModelConfig) -> dict[str, Any]:
        return {"max_ongoing_requests": 256, "max_queued_requests": 2048, "num_replicas": 1,
                "ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 10}

    def card(self) -> ModelCard:
        return replace(self.cfg.card(self.created), context_length=self.encoder.max_length,
                       embedding_dimensions=self.encoder.dim)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        if req.dimensions is not None:
            self._check_dimensions(req.dimensions)
        if len(req.inputs) > self.cfg.engine.max_inputs:
            raise InvalidRequestError(f"At most {self.cfg.engine.max_inputs} inputs per request.", param="input")
        token_lists = self.encoder.tokenize(req.inputs, req.truncate_prompt_tokens)
        vectors = await self._encode_batch(token_lists)
        if req.dimensions is not None and req.dimensions != self.encoder.dim:
            vectors = self.encoder.shorten(vectors, req.dimensions)
        return EmbedResult(vectors, sum(len(t) for t in token_lists))

    async def embed_many(self, reqs: list[EmbedRequest]) -> list[Union[EmbedResult, ModelHubError]]:
        """Several requests in one handle call (the ingress coalesces them); a bad request gets its
        own error in its slot and harms no other."""
        return await asyncio.gather(*(_error_as_value(self.embed(r)) for r in reqs))

    async def _encode(self, requests: list[list[list[int]]]) -> list:
        """One encode call for the inputs of several requests; each gets its own rows back."""
        flat = [ids for req in requests for ids in req]
        vectors = await self._model_thread.call(self.encoder.encode, flat)
        out, start = [], 0
        for req in requests:
            out.append(vectors[start:start + len(req)])
            start += len(req)
        return out

    def _check_dimensions(self, dimensions: int) -> None:
        allowed = self.cfg.engine.matryoshka_dimensions
        if not allowed:
            raise InvalidRequestError(f"Model '{self.cfg.id}' does not support specifying dimensions.",
                                      param="dimensions", code="unsupported_parameter")
        if dimensions not in allowed and dimensions != self.encoder.dim:
            raise InvalidRequestError(f"dimensions must be one of {sorted(set(allowed))}.", param="dimensions")


async def _error_as_value(work) -> Any:
    try:
        return await work
    except ModelHubError as exc:
        return exc
