"""Pieces shared by the request models: strict base class, sampling fields, stop, stream options.

Unknown fields are rejected (OpenAI answers "Unrecognized request argument supplied"), so a
parameter this server does not implement can never be silently ignored.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from deployments.config import RequestLimits
from deployments.errors import InvalidRequestError, UnsupportedParameterError
from deployments.types import SamplingParams

_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")   # ASCII only: str.isdigit also takes '²' and '١', which int() refuses


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def check_limits(self, limits: RequestLimits) -> None:
        """Raises a 400 naming the cap a request is over (RequestLimits), before any model work."""


MAX_JSON_DEPTH = 32   # free-form JSON (schemas) deeper than this is a 400: later steps recurse over it


def check_depth(value: Any, param: str) -> None:
    """Free-form JSON (a tool's parameters, a response schema) nested too deeply is a 400; typed
    fields cannot nest, so this is the only place depth needs a bound."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequestError(f"Invalid '{param}': nested more than {MAX_JSON_DEPTH} levels deep.",
                                      param=param, code="invalid_value")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def over_limit(param: str, what: str, limit: int, setting: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid '{param}': {what} is over this server's limit of {limit} "
                               f"(limits.{setting}).", param=param, code="limit_exceeded")


class StreamOptions(WireModel):
    include_usage: Optional[StrictBool] = False


class SamplingFields(WireModel):
    """Fields chat and completions share, with OpenAI's ranges."""

    model: str
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=128)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, int]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    user: Optional[str] = None
    # vLLM's sampling extensions (the openai client sends them in extra_body), with vLLM's ranges
    top_k: Optional[int] = Field(None, ge=-1)                 # 0 or -1: every token
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=100)
    min_tokens: Optional[int] = Field(None, ge=0)
    stop_token_ids: Optional[list[StrictInt]] = None
    ignore_eos: Optional[StrictBool] = None

    @model_validator(mode="before")
    @classmethod
    def _no_nucleus_sentinel(cls, data):
        """`top_p: -1` means no nucleus filtering (the IONOS API documents it as the default)."""
        if isinstance(data, dict) and type(data.get("top_p")) in (int, float) and data["top_p"] == -1:
            return {**data, "top_p": 1.0}
        return data

    @field_validator("model")
    @classmethod
    def _model_given(cls, v: str) -> str:
        if not v:
            raise ValueError("you must provide a model parameter")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("stop may hold at most 4 sequences")
        return v

    def check_common(self) -> None:
        """Cross-field rules the real API enforces."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                      param="stream_options", code="invalid_value")
        for key, bias in (self.logit_bias or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise InvalidRequestError(f"Invalid key in 'logit_bias': {key!r} is not a token id.",
                                          param="logit_bias", code="invalid_value")
            if not -100 <= bias <= 100:
                raise InvalidRequestError(f"Logit bias value {bias} is invalid or outside of range [-100, 100].",
                                          param="logit_bias")

    def check_sampling_limits(self, limits: RequestLimits) -> None:
        if any(len(s) > limits.max_stop_chars for s in self.stop_list()):
            raise over_limit("stop", "a stop string's length", limits.max_stop_chars, "max_stop_chars")
        if len(self.logit_bias or {}) > limits.max_logit_bias:
            raise over_limit("logit_bias", "the number of entries", limits.max_logit_bias, "max_logit_bias")
        if len(self.stop_token_ids or []) > limits.max_stop_token_ids:
            raise over_limit("stop_token_ids", "the number of entries", limits.max_stop_token_ids,
                             "max_stop_token_ids")

    def check_min_tokens(self, max_tokens: Optional[int]) -> None:
        """vLLM's rule: min_tokens may not exceed max_tokens."""
        if self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must be less than or equal to max_tokens "
                                      f"({max_tokens}).", param="min_tokens", code="invalid_value")

    def sampling_params(self, **kw: Any) -> SamplingParams:
        """The engine's SamplingParams from the fields chat and completions share; `kw` adds the rest."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p,   # None: the model's configured default
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.bias_map(), seed=self.seed, stop=self.stop_list(), n=self.n or 1,
            top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_tokens=self.min_tokens or 0, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos), **kw)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def bias_map(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatNoOpFields(WireModel):
    """Current OpenAI chat fields that cannot change what this server generates, accepted as
    documented no-ops (docs/openai-compat.md). A value that asks for a behaviour this server lacks
    (storing the completion, audio output, a paid service tier) is refused naming the field."""

    store: Optional[StrictBool] = None
    metadata: Optional[dict[str, str]] = None
    safety_identifier: Optional[str] = Field(None, max_length=64)
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[Literal["in_memory", "24h"]] = None
    service_tier: Optional[str] = None
    modalities: Optional[list[Literal["text", "audio"]]] = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata holds at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v

    def check_no_ops(self) -> None:
        if self.store:
            raise UnsupportedParameterError("'store': true is not supported: this server keeps no completions.",
                                            param="store")
        if self.service_tier not in (None, "auto", "default"):
            raise UnsupportedParameterError(f"service_tier {self.service_tier!r} is not supported; this server has "
                                            "one tier ('auto' or 'default').", param="service_tier")
        if self.modalities is not None and self.modalities != ["text"]:
            raise UnsupportedParameterError("Only text output is supported: 'modalities' must be [\"text\"].",
                                            param="modalities")
