"""The rerank Serve deployment (kind `rerank`): a sentence-transformers CrossEncoder scores
(query, document) pairs for /v1/rerank and /v1/score. Requests are validated and tokenized one by
one, then @serve.batch gathers the pairs of concurrent requests into one scoring call on the model's
thread, as embeddings do. No FastAPI here; torch loads inside __init__ only.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Optional

from ray import serve

from deployments.config import RerankModelConfig
from deployments.errors import InvalidRequestError
from deployments.loading import loading
from deployments.threads import ModelThread
from deployments.types import ModelCard, ScoreRequest, ScoreResult


class RerankServer:
    def __init__(self, model_cfg: RerankModelConfig, *, scorer_factory: Optional[Callable] = None):
        from deployments.rerank.scorer import CrossEncoderScorer
        self.cfg = model_cfg
        self._model_thread = ModelThread("cross-encoder")   # loads and scores: one OpenMP pool (threads.py)
        with loading(model_cfg):
            self.scorer = self._model_thread.run(scorer_factory or CrossEncoderScorer.load, model_cfg.source,
                                                 model_cfg.engine)
        # Batched per instance (a decorated method would share one queue among all instances).
        self._score_batch = serve.batch(max_batch_size=model_cfg.engine.max_batch_size,
                                        batch_wait_timeout_s=model_cfg.engine.batch_wait_timeout_s)(self._score)
        self.created = int(time.time())

    @staticmethod
    def default_options(cfg: RerankModelConfig) -> dict[str, Any]:
        return {"max_ongoing_requests": 256, "max_queued_requests": 2048, "num_replicas": 1,
                "ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 10}

    def card(self) -> ModelCard:
        return replace(self.cfg.card(self.created), context_length=self.scorer.max_length)

    async def score(self, req: ScoreRequest) -> ScoreResult:
        if not req.pairs:
            raise InvalidRequestError("There is nothing to score.", param="documents")
        if len(req.pairs) > self.cfg.engine.max_documents:
            raise InvalidRequestError(f"At most {self.cfg.engine.max_documents} documents per request.",
                                      param="documents")
        lengths = self.scorer.count_tokens(req.pairs)
        scores = await self._score_batch((req.pairs, lengths))
        return ScoreResult([float(s) for s in scores], sum(lengths))

    async def _score(self, requests: list[tuple[list, list[int]]]) -> list:
        """One scoring call for the pairs of several requests; each gets its own scores back."""
        pairs = [p for req, _ in requests for p in req]
        lengths = [n for _, lens in requests for n in lens]
        scores = await self._model_thread.call(self.scorer.score, pairs, lengths)
        out, start = [], 0
        for req, _ in requests:
            out.append(scores[start:start + len(req)])
            start += len(req)
        return out
