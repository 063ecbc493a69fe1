"""Pieces shared by the request models: strict base class, sampling fields, stop, stream options.

Unknown fields are rejected (OpenAI answers "Unrecognized request argument supplied"), so a
parameter this server does not implement can never be silently ignored.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr, field_validator,
                      model_validator)

from deployments.config import RequestLimits
from deployments.errors import InvalidRequestError, UnsupportedParameterError
from deployments.types import RankedLogprob, SamplingParams
from ingress.protocol.schema import check_json_schema

_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")   # ASCII only: str.isdigit also takes '²' and '١', which int() refuses


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def check_limits(self, limits: RequestLimits) -> None:
        """Raises a 400 naming the cap a request is over (RequestLimits), before any model work."""


MAX_JSON_DEPTH = 32   # free-form JSON (schemas) deeper than this is a 400: later steps recurse over it


def json_object_text(text: str, param: str, what: str) -> dict[str, Any]:
    """A JSON object a client sent as text inside a field; a 400 naming `param` unless it parses to an
    object nested at most MAX_JSON_DEPTH deep (text nested past the parser's own limit included)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"Invalid '{param}': expected {what} (an object, or its JSON text).",
                                  param=param, code="invalid_type")
    check_depth(value, param)
    return value


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


def check_truncation(keep: Optional[int]) -> None:
    """vLLM's truncate_prompt_tokens: -1 (the model's maximum) or a number of tokens to keep."""
    if keep == 0:
        raise InvalidRequestError("Invalid 'truncate_prompt_tokens': 0 would leave no prompt; send -1 (the model's "
                                  "maximum length) or a number of tokens to keep.",
                                  param="truncate_prompt_tokens", code="invalid_value")


def over_limit(param: str, what: str, limit: int, setting: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid '{param}': {what} is over this server's limit of {limit} "
                               f"(limits.{setting}).", param=param, code="limit_exceeded")


class StreamOptions(WireModel):
    include_usage: Optional[StrictBool] = False
    continuous_usage_stats: Optional[StrictBool] = None   # vLLM's: usage on every chunk (with include_usage)


class StructuredOutputs(WireModel):
    """vLLM's `structured_outputs`: exactly one constraint the output must match, enforced while
    decoding by a grammar (xgrammar), as `response_format` is. `json`: a JSON schema (an object, or
    its JSON text); `regex`; `choice`: the output is exactly one of these strings; `grammar`: EBNF
    (xgrammar's GBNF dialect, told by its `::=`) or Lark; `json_object`: any JSON object;
    `structural_tag`: an xgrammar structural tag (or its JSON text), see _structural_tag."""

    schema_: Optional[Union[dict[str, Any], StrictStr]] = Field(None, alias="json")
    regex: Optional[StrictStr] = None
    choice: Optional[list[StrictStr]] = Field(None, min_length=1)
    grammar: Optional[StrictStr] = None
    json_object: Optional[StrictBool] = None
    structural_tag: Optional[Union[dict[str, Any], StrictStr]] = None
    # how JSON is written (json, json_object, and JSON inside a structural tag); vLLM's names
    disable_any_whitespace: Optional[StrictBool] = None          # default true here: single spaces
    disable_additional_properties: Optional[StrictBool] = None   # default true here: nothing unasked for
    _schema: Optional[dict[str, Any]] = PrivateAttr(None)   # `json` as check() parsed it
    _tag: Optional[dict[str, Any]] = PrivateAttr(None)      # `structural_tag` as check() read it

    def check_limits(self, limits: RequestLimits) -> None:
        check_depth(self.schema_, "structured_outputs.json")
        check_depth(self.structural_tag, "structured_outputs.structural_tag")
        if len(json.dumps(self.model_dump(by_alias=True, exclude_none=True))) > limits.max_schema_bytes:
            raise over_limit("structured_outputs", "the constraint's size in bytes", limits.max_schema_bytes,
                             "max_schema_bytes")

    def spec(self) -> dict[str, Any]:
        """The engine's grammar spec (deployments/llm/structured.py), after check()."""
        base: dict[str, Any] = {"param": "structured_outputs"}
        if self.disable_any_whitespace is False:
            base["any_whitespace"] = True
        if self.disable_additional_properties is False:
            base["strict"] = False
        if self.schema_ is not None:
            schema = self._schema if self._schema is not None else (
                json.loads(self.schema_) if isinstance(self.schema_, str) else self.schema_)
            return {**base, "type": "json_schema", "schema": schema}
        if self.regex is not None:
            return {**base, "type": "regex", "regex": self.regex}
        if self.choice is not None:
            return {**base, "type": "choice", "choice": list(self.choice)}
        if self.grammar is not None:
            return {**base, "type": "grammar", "grammar": self.grammar}
        if self._tag is not None:
            return {**base, "type": "structural_tag", "format": self._tag["format"]}
        return {**base, "type": "json_object"}

    def check(self) -> None:
        kinds = [k for k, v in (("json", self.schema_), ("regex", self.regex), ("choice", self.choice),
                                ("grammar", self.grammar), ("json_object", self.json_object),
                                ("structural_tag", self.structural_tag)) if v is not None]
        if len(kinds) != 1:
            raise InvalidRequestError("'structured_outputs' takes exactly one of 'json', 'regex', 'choice', 'grammar', "
                                      f"'json_object' or 'structural_tag'; got {len(kinds)}.",
                                      param="structured_outputs", code="invalid_value")
        if self.structural_tag is not None:
            self._tag = _structural_tag(self.structural_tag)
        json_style = [k for k in ("disable_any_whitespace", "disable_additional_properties")
                      if getattr(self, k) is not None]
        if json_style and kinds[0] not in ("json", "json_object", "structural_tag"):
            param = f"structured_outputs.{json_style[0]}"
            raise InvalidRequestError(f"'{param}' shapes JSON output; with '{kinds[0]}' it could not take effect.",
                                      param=param, code="invalid_parameter_combination")
        if self.json_object is False:
            raise InvalidRequestError("'structured_outputs.json_object' may only be true.",
                                      param="structured_outputs.json_object", code="invalid_value")
        schema = self.schema_
        if isinstance(schema, str):
            schema = json_object_text(schema, "structured_outputs.json", "a JSON schema")
        if schema is not None:
            check_json_schema(schema, "structured_outputs.json", "structured_outputs", strict=False)
            self._schema = schema
        if self.grammar is not None and not self.grammar.strip():
            raise InvalidRequestError("'structured_outputs.grammar' is empty.", param="structured_outputs.grammar",
                                      code="invalid_value")


def _structural_tag(value: Union[dict[str, Any], str]) -> dict[str, Any]:
    """vLLM's structured_outputs.structural_tag, as xgrammar's current format
    {"type": "structural_tag", "format": {...}}. The legacy form vLLM's examples use,
    {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (free text until a trigger, then
    one of the structures whose begin it starts, its JSON, its end), becomes the "triggered_tags"
    format it stands for, as xgrammar's own conversion does. xgrammar checks the rest when it compiles."""
    param = "structured_outputs.structural_tag"
    tag = json_object_text(value, param, "a structural tag") if isinstance(value, str) else value
    if "structures" not in tag:
        if tag.get("type") != "structural_tag" or not isinstance(tag.get("format"), dict):
            raise InvalidRequestError(f"Invalid '{param}': expected {{\"type\": \"structural_tag\", \"format\": "
                                      "{...}} (xgrammar's structural tag) or {\"structures\": [...], \"triggers\": "
                                      "[...]}.", param=param, code="invalid_value")
        return tag
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not (isinstance(structures, list) and structures and isinstance(triggers, list) and triggers
            and all(isinstance(t, str) and t for t in triggers)
            and all(isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                    and isinstance(s.get("schema"), dict) for s in structures)):
        raise InvalidRequestError(f"Invalid '{param}': 'structures' must be objects with string 'begin' and 'end' "
                                  "and a JSON schema 'schema', and 'triggers' non-empty strings.",
                                  param=param, code="invalid_value")
    for i, s in enumerate(structures):
        check_json_schema(s["schema"], param, f"{param} structures[{i}]", strict=False)
    return {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": triggers,
        "tags": [{"type": "tag", "begin": s["begin"], "content": {"type": "json_schema", "json_schema": s["schema"]},
                  "end": s["end"]} for s in structures]}}


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
    allowed_token_ids: Optional[list[StrictInt]] = Field(None, min_length=1)
    bad_words: Optional[list[StrictStr]] = None
    skip_special_tokens: Optional[StrictBool] = None
    include_stop_str_in_output: Optional[StrictBool] = None
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)   # -1: the model's context length; 0: 400
    truncation_side: Optional[Literal["left", "right"]] = None   # which end truncate_prompt_tokens keeps
    structured_outputs: Optional[StructuredOutputs] = None
    return_token_ids: Optional[StrictBool] = None   # the prompt's and the output's token ids beside the text
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=20)   # vLLM's; 20 is its default max_logprobs
    return_tokens_as_token_ids: Optional[StrictBool] = None     # logprob tokens as "token_id:<id>"

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
        if self.stream_options is not None and self.stream_options.continuous_usage_stats \
                and not self.stream_options.include_usage:
            raise InvalidRequestError("'stream_options.continuous_usage_stats' only takes effect with "
                                      "'stream_options.include_usage'.", param="stream_options.continuous_usage_stats",
                                      code="invalid_parameter_combination")
        if self.structured_outputs is not None:
            self.structured_outputs.check()
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError("'prompt_logprobs' is not available when 'stream' is true (as in vLLM).",
                                      param="prompt_logprobs", code="invalid_parameter_combination")
        check_truncation(self.truncate_prompt_tokens)
        if any(not w.strip() for w in self.bad_words or []):
            raise InvalidRequestError("Invalid 'bad_words': an entry is empty or only whitespace.", param="bad_words",
                                      code="invalid_value")
        if self.truncation_side is not None and self.truncate_prompt_tokens is None:
            raise InvalidRequestError("'truncation_side' only takes effect with 'truncate_prompt_tokens'.",
                                      param="truncation_side", code="invalid_parameter_combination")
        for key, bias in (self.logit_bias or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise InvalidRequestError(f"Invalid key in 'logit_bias': {key!r} is not a token id.",
                                          param="logit_bias", code="invalid_value")
            if not -100 <= bias <= 100:
                raise InvalidRequestError(f"Logit bias value {bias} is invalid or outside of range [-100, 100].",
                                          param="logit_bias")

    def check_logprob_options(self, with_logprobs: bool) -> None:
        """return_tokens_as_token_ids changes how logprobs name tokens: without logprobs it could not
        take effect."""
        if self.return_tokens_as_token_ids and not with_logprobs:
            raise InvalidRequestError("'return_tokens_as_token_ids' only takes effect with 'logprobs'.",
                                      param="return_tokens_as_token_ids", code="invalid_parameter_combination")

    def check_sampling_limits(self, limits: RequestLimits) -> None:
        if any(len(s) > limits.max_stop_chars for s in self.stop_list()):
            raise over_limit("stop", "a stop string's length", limits.max_stop_chars, "max_stop_chars")
        if len(self.logit_bias or {}) > limits.max_logit_bias:
            raise over_limit("logit_bias", "the number of entries", limits.max_logit_bias, "max_logit_bias")
        if any(len(w) > limits.max_stop_chars for w in self.bad_words or []):
            raise over_limit("bad_words", "a bad word's length", limits.max_stop_chars, "max_stop_chars")
        if len(self.bad_words or []) > limits.max_bad_words:
            raise over_limit("bad_words", "the number of entries", limits.max_bad_words, "max_bad_words")
        if len(self.stop_token_ids or []) > limits.max_stop_token_ids:
            raise over_limit("stop_token_ids", "the number of entries", limits.max_stop_token_ids,
                             "max_stop_token_ids")
        if self.structured_outputs is not None:
            self.structured_outputs.check_limits(limits)

    def check_constrained(self, max_tokens: Optional[int], constrained_by: Optional[str]) -> None:
        """vLLM's rule: min_tokens may not exceed max_tokens. Neither min_tokens nor allowed_token_ids
        may go with a grammar (`constrained_by` names it): the grammar decides where the reply ends, and
        which tokens it needs."""
        if self.allowed_token_ids and constrained_by is not None:
            raise UnsupportedParameterError(f"'allowed_token_ids' cannot be combined with {constrained_by}: its "
                                            "grammar may need other tokens.", param="allowed_token_ids")
        if not self.min_tokens:
            return
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must be less than or equal to max_tokens "
                                      f"({max_tokens}).", param="min_tokens", code="invalid_value")
        if constrained_by is not None:
            raise UnsupportedParameterError(f"'min_tokens' cannot be combined with {constrained_by}: its grammar "
                                            "decides where the reply ends.", param="min_tokens")

    def output_constraint(self) -> Optional[dict[str, Any]]:
        """The grammar spec of `structured_outputs`, if any (chat adds response_format and tools)."""
        return None if self.structured_outputs is None else self.structured_outputs.spec()

    def sampling_params(self, **kw: Any) -> SamplingParams:
        """The engine's SamplingParams from the fields chat and completions share; `kw` adds the rest."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p,   # None: the model's configured default
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.bias_map(), seed=self.seed, stop=self.stop_list(), n=self.n or 1,
            top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_tokens=self.min_tokens or 0, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos), allowed_token_ids=self.allowed_token_ids,
            bad_words=list(self.bad_words or []), skip_special_tokens=self.skip_special_tokens is not False,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            truncate_prompt_tokens=self.truncate_prompt_tokens, truncation_side=self.truncation_side or "left",
            return_token_ids=bool(self.return_token_ids), prompt_logprobs=self.prompt_logprobs,
            return_tokens_as_token_ids=bool(self.return_tokens_as_token_ids),
            continuous_usage=self.include_usage and bool(self.stream_options.continuous_usage_stats), **kw)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def bias_map(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def prompt_logprobs_json(entries: list[Optional[list[RankedLogprob]]]) -> list[Optional[dict[str, Any]]]:
    """vLLM's prompt_logprobs on the wire: per prompt token (none for the first), its own entry then
    its alternatives, keyed by token id."""
    return [None if e is None else {str(x.token_id): {"logprob": x.logprob, "rank": x.rank,
                                                      "decoded_token": x.decoded_token} for x in e}
            for e in entries]


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
