"""Scores (query, document) pairs with whichever model the request names: a cross-encoder
(kind `rerank`) scores each pair itself; a bi-encoder (kind `embedding`) embeds every distinct
text once and scores a pair by the cosine similarity of its two vectors. No torch here.
"""
from __future__ import annotations

import numpy as np

from deployments.types import EmbedRequest, ScoreRequest, ScoreResult
from ingress.backends import ModelEntry

SCORING_KINDS = ("rerank", "embedding")   # the first configured model of these answers when `model` is omitted


async def score_pairs(entry: ModelEntry, pairs: list[tuple[str, str]]) -> ScoreResult:
    if entry.cfg.kind == "rerank":
        return await entry.client.score(ScoreRequest(pairs))
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    row = {t: i for i, t in enumerate(texts)}
    result = await entry.client.embed(EmbedRequest(texts))
    vectors = np.asarray(result.embeddings, dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    scores = [float(vectors[row[q]] @ vectors[row[d]]) for q, d in pairs]
    return ScoreResult(scores, result.prompt_tokens)
