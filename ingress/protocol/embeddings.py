"""POST /v1/embeddings: request model and response rendering (float lists or base64 float32)."""
from __future__ import annotations

import base64
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import Field, StrictInt, StrictStr, field_validator

from deployments.types import EmbedRequest
from deployments.config import RequestLimits
from ingress.protocol.common import WireModel, check_truncation, over_limit

EmbeddingInput = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class EmbeddingRequest(WireModel):
    model: Optional[str] = Field(None, min_length=1)   # omitted: the first embedding model configured
    input: EmbeddingInput
    encoding_format: Optional[Literal["float", "base64"]] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)   # vLLM's: keep each input's first k tokens

    @field_validator("input")
    @classmethod
    def _shape(cls, v):
        if isinstance(v, str):
            if not v:
                raise ValueError("input must not be an empty string")
            return v
        if not v:
            raise ValueError("input must not be an empty list")
        if len(v) > 2048:
            raise ValueError("input may hold at most 2048 items")
        for item in v:
            if (isinstance(item, str) and not item) or (isinstance(item, list) and not item):
                raise ValueError("input items must not be empty")
        return v

    def check_limits(self, limits: RequestLimits) -> None:
        inputs = self.inputs()
        if len(inputs) > limits.max_embedding_inputs:
            raise over_limit("input", "the number of inputs", limits.max_embedding_inputs, "max_embedding_inputs")
        if any(len(x) > limits.max_embedding_input_chars for x in inputs):
            raise over_limit("input", "an input's length in characters (or token ids)",
                             limits.max_embedding_input_chars, "max_embedding_input_chars")

    def inputs(self) -> list[Union[str, list[int]]]:
        v = self.input
        if isinstance(v, str):
            return [v]
        if isinstance(v[0], int):
            return [list(v)]
        return list(v)

    def check(self) -> None:
        check_truncation(self.truncate_prompt_tokens)

    def to_embed_request(self) -> EmbedRequest:
        return EmbedRequest(self.inputs(), self.dimensions, self.truncate_prompt_tokens)


def embedding_response(vectors: np.ndarray, model: str, prompt_tokens: int, encoding: str) -> dict[str, Any]:
    if encoding == "base64":
        le = vectors.astype("<f4", copy=False)
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in le]
    else:
        data = vectors.tolist()
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
