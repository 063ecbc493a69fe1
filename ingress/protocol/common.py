"""Pieces shared by the request models: strict base class, sampling fields, stop, stream options.

Unknown fields are rejected (OpenAI answers "Unrecognized request argument supplied"), so a
parameter this server does not implement can never be silently ignored.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from deployments.config import RequestLimits
from deployments.errors import InvalidRequestError

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

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def bias_map(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)
