"""Pieces shared by the request models: strict base class, sampling fields, stop, stream options.

Unknown fields are rejected (OpenAI answers "Unrecognized request argument supplied"), so a
parameter this server does not implement can never be silently ignored.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from deployments.errors import InvalidRequestError, UnsupportedParameterError


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


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
            if not key.lstrip("-").isdigit():
                raise InvalidRequestError(f"Invalid key in 'logit_bias': {key!r} is not a token id.",
                                          param="logit_bias", code="invalid_value")
            if not -100 <= bias <= 100:
                raise InvalidRequestError(f"Logit bias value {bias} is invalid or outside of range [-100, 100].",
                                          param="logit_bias")

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
