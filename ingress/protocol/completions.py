"""POST /v1/completions (legacy): request model, conversion, and the logprobs shape."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator

from deployments.errors import UnsupportedParameterError
from deployments.types import GenerateRequest, TokenLogprob
from deployments.config import RequestLimits
from ingress.protocol.common import SamplingFields, over_limit

PromptInput = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    # None: the model's default_max_tokens, else 16. 0 (the spec's minimum): no output, only the echoed
    # prompt and its logprobs (a prompt's score, as lm-eval-harness and vLLM use it).
    max_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[StrictBool] = False
    best_of: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt lists must not be empty")
        return v

    def check_limits(self, limits: RequestLimits) -> None:
        self.check_sampling_limits(limits)
        if sum(len(p) for p in self.prompts()) > limits.max_prompt_chars:
            raise over_limit("prompt", "the prompt's length in characters (or token ids)", limits.max_prompt_chars,
                             "max_prompt_chars")

    def check(self) -> None:
        self.check_common()
        self.check_logprob_options(self.logprobs is not None)
        self.check_constrained(self.max_tokens, "structured_outputs" if self.structured_outputs is not None else None)
        if self.suffix:
            raise UnsupportedParameterError("'suffix' (insertion) is not supported by this server.", param="suffix")
        if self.best_of not in (None, 1) and self.best_of != (self.n or 1):
            raise UnsupportedParameterError("'best_of' other than n is not supported by this server.",
                                            param="best_of")

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def to_generate_request(self, request_id: str) -> GenerateRequest:
        params = self.sampling_params(max_tokens=self.max_tokens, logprobs=self.logprobs, echo=bool(self.echo))
        return GenerateRequest(request_id, params, prompts=self.prompts(), response_format=self.output_constraint())


class LogprobsAccumulator:
    """Builds the completions `logprobs` object; text_offset runs on across chunks of one choice."""

    def __init__(self):
        self.offset = 0

    def render(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(e.token)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({t: lp for t, lp, _ in e.top} if e.logprob is not None else None)
            out["text_offset"].append(self.offset)
            self.offset += len(e.token)
        return out


def token_ids_json(prompt_ids: Optional[list[int]], ids: Optional[list[int]]) -> dict[str, list[int]]:
    """vLLM's return_token_ids on a completions choice: the prompt's ids (on a stream's first event of
    the choice) and the tokens sampled (all of them, or a stream event's new ones)."""
    out = {}
    if prompt_ids is not None:
        out["prompt_token_ids"] = prompt_ids
    if ids is not None:
        out["token_ids"] = ids
    return out
