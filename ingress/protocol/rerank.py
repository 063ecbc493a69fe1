"""POST /v1/rerank (Cohere/Jina shape, as vLLM serves it) and POST /v1/score (vLLM's shape):
request models, the (query, document) pairs they ask about, and the response shapes.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field, StrictBool, StrictStr

from deployments.errors import InvalidRequestError
from deployments.config import RequestLimits
from ingress.protocol.common import WireModel, over_limit

Pair = tuple[str, str]


class DocumentIn(WireModel):
    text: StrictStr


class RerankRequest(WireModel):
    model: Optional[str] = Field(None, min_length=1)   # omitted: the first rerank model, else embedding model
    query: StrictStr
    documents: list[Union[StrictStr, DocumentIn]] = Field(min_length=1)
    top_n: Optional[int] = Field(None, ge=0)            # 0 or omitted: every document
    return_documents: Optional[StrictBool] = True

    def check_limits(self, limits: RequestLimits) -> None:
        check_texts([self.query], self.texts(), limits, "documents")

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def pairs(self) -> list[Pair]:
        return [(self.query, d) for d in self.texts()]


class ScoreTextsRequest(WireModel):
    model: Optional[str] = Field(None, min_length=1)
    text_1: Union[StrictStr, list[StrictStr]]
    text_2: Union[StrictStr, list[StrictStr]]

    def check_limits(self, limits: RequestLimits) -> None:
        listed = lambda t: [t] if isinstance(t, str) else t   # noqa: E731
        check_texts(listed(self.text_1), listed(self.text_2), limits, "text_2")

    def pairs(self) -> list[Pair]:
        """One text_1 against each text_2, or the two lists pairwise (vLLM's rules)."""
        left = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        right = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if not left or not right:
            raise InvalidRequestError("text_1 and text_2 must not be empty.", param="text_1" if not left else "text_2")
        if len(left) == 1:
            left = left * len(right)
        if len(left) != len(right):
            raise InvalidRequestError(f"text_1 has {len(left)} items and text_2 {len(right)}: give one text_1, or "
                                      "as many as text_2.", param="text_2")
        return list(zip(left, right))


def check_texts(queries: list[str], documents: list[str], limits: RequestLimits, param: str) -> None:
    """Scoring shares the embeddings caps: items per request and characters per item."""
    if len(documents) > limits.max_embedding_inputs:
        raise over_limit(param, "the number of documents", limits.max_embedding_inputs, "max_embedding_inputs")
    if any(len(t) > limits.max_embedding_input_chars for t in queries + documents):
        raise over_limit(param, "a text's length in characters", limits.max_embedding_input_chars,
                         "max_embedding_input_chars")


def rerank_json(rid: str, model: str, req: RerankRequest, scores: list[float], tokens: int) -> dict[str, Any]:
    texts = req.texts()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if req.top_n:
        order = order[: req.top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return {"id": rid, "model": model, "usage": {"total_tokens": tokens}, "results": results}


def score_json(rid: str, created: int, model: str, scores: list[float], tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "list", "created": created, "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}
