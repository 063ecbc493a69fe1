"""Small picklable dataclasses that cross the DeploymentHandle between ingress and models.

The ingress converts OpenAI wire models into these; the engines never see OpenAI types and the
ingress never sees tensors. Must not import torch, FastAPI or Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from deployments.errors import InvalidRequestError

Prompt = Union[str, list[int]]


# ----------------------------------------------------------------------------- LLM

@dataclass
class SamplingParams:
    """Per-request sampling settings, with OpenAI's meanings."""

    max_tokens: Optional[int] = None      # None: as many as fit in the context window
    temperature: Optional[float] = None   # 0 means greedy; None: the model's default (else 1.0)
    top_p: Optional[float] = None         # None: the model's default (else 1.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: Optional[int] = None        # None: off; k >= 0: chosen token plus k alternatives
    echo: bool = False                    # completions: return the prompt before the output
    # vLLM's sampling extensions, with vLLM's meanings; the defaults change nothing
    top_k: int = 0                        # keep the k likeliest tokens; 0 (or -1): all
    min_p: float = 0.0                    # drop tokens below min_p x the likeliest token's probability
    repetition_penalty: float = 1.0       # > 1 discourages every token of the prompt and output so far
    min_tokens: int = 0                   # no EOS, stop token or stop string before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)   # these end the choice like EOS
    ignore_eos: bool = False              # EOS does not end the choice
    allowed_token_ids: Optional[list[int]] = None   # only these tokens may be drawn
    bad_words: list[str] = field(default_factory=list)   # words the output may not contain
    bad_word_ids: list[list[int]] = field(default_factory=list)   # bad_words as the model server tokenized them
    skip_special_tokens: bool = True      # special tokens' text is left out of the output
    include_stop_str_in_output: bool = False   # a matched stop string stays at the end of the output
    truncate_prompt_tokens: Optional[int] = None   # keep k of the prompt's tokens; -1: as many as the model holds
    truncation_side: Literal["left", "right"] = "left"   # left: keep the last k (vLLM's default for generation)
    return_token_ids: bool = False        # each choice also returns its prompt's and its output's token ids
    prompt_logprobs: Optional[int] = None  # each prompt token's logprob and rank, with k alternatives
    return_tokens_as_token_ids: bool = False   # logprob entries name tokens "token_id:<id>", not by their text
    continuous_usage: bool = False        # vLLM's continuous_usage_stats: each streamed chunk carries the usage so far


@dataclass
class ToolSpec:
    """What the model is told about tools, and what it is forced to do with them."""

    tools: list[dict[str, Any]]           # OpenAI `tools` entries ({"type": "function", "function": {...}})
    choice: Union[Literal["auto", "required"], str] = "auto"  # or the name of a forced function
    parallel: bool = True                 # several calls in one reply; False: at most one


@dataclass
class ChatTemplateOptions:
    """How chat messages are rendered into the prompt (vLLM's chat-template fields)."""

    add_generation_prompt: bool = True    # open the assistant's turn after the messages
    continue_final_message: bool = False  # leave the last message open: the reply continues it
    kwargs: dict[str, Any] = field(default_factory=dict)   # chat_template_kwargs: the template's own variables


@dataclass
class GenerateRequest:
    """One chat or completions call. Chat sends `messages`; completions send `prompts`."""

    request_id: str                       # the ingress's id for the call, a label for logs; engines key work by their own
    sampling: SamplingParams
    messages: Optional[list[dict[str, Any]]] = None
    prompts: Optional[list[Prompt]] = None
    tools: Optional[ToolSpec] = None
    # the grammar the output must match: {"type": "json_object"}, {"type": "json_schema", "schema": ...}
    # (response_format), or vLLM's structured_outputs: also {"type": "regex", "regex": ...}, {"type":
    # "choice", "choice": [...]}, {"type": "grammar", "grammar": EBNF or Lark}; "param" names the field
    response_format: Optional[dict[str, Any]] = None
    template: Optional[ChatTemplateOptions] = None     # chat only; None: the defaults


def truncation_length(keep: int, maximum: int, what: str) -> int:
    """vLLM's truncate_prompt_tokens against a model's maximum (`what` names it): -1 means the maximum,
    and more than it is a 400, as in vLLM."""
    if keep > maximum:
        raise InvalidRequestError(f"truncate_prompt_tokens ({keep}) is greater than this model's {what} ({maximum}).",
                                  param="truncate_prompt_tokens", code="invalid_value")
    return maximum if keep == -1 else keep


def constraint_param(spec: dict[str, Any]) -> str:
    """The request field a grammar spec (GenerateRequest.response_format, or a forced tool call's
    structural tag) came from, for errors."""
    return spec.get("param") or ("tools" if spec["type"] == "structural_tag" else "response_format")


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class RankedLogprob:
    """vLLM's Logprob: a token's log-probability, its rank in the vocabulary (1: the likeliest) and its text."""

    token_id: int
    logprob: float
    rank: int
    decoded_token: str


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str   # JSON text


@dataclass
class ToolCallDelta:
    """A streamed piece of one tool call: the first piece of call `index` carries its id and name,
    later ones only a fragment of its arguments (OpenAI's ChoiceDeltaToolCall)."""

    index: int
    id: Optional[str]
    name: Optional[str]
    arguments: str


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous chunk."""

    index: int
    text: str = ""
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None   # complete calls, on the choice's last delta
    tool_call_deltas: Optional[list[ToolCallDelta]] = None   # what a stream sends of the calls
    token_ids: Optional[list[int]] = None          # return_token_ids: the tokens sampled since the last delta
    prompt_token_ids: Optional[list[int]] = None   # return_token_ids: the prompt's ids, on the choice's first delta
    # vLLM's prompt_logprobs, on the choice's first delta: None for the first token, then per token its
    # own entry followed by the k likeliest others
    prompt_logprobs: Optional[list[Optional[list[RankedLogprob]]]] = None

    def extend(self, later: ChoiceDelta) -> None:
        """Appends a later delta of the same choice: chunks merged for a consumer that fell behind,
        or a whole result gathered from its stream."""
        self.text += later.text
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.token_ids is not None:
            self.token_ids = (self.token_ids or []) + later.token_ids
        if later.tool_call_deltas:
            self.tool_call_deltas = (self.tool_call_deltas or []) + later.tool_call_deltas
        self.prompt_token_ids = self.prompt_token_ids or later.prompt_token_ids
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs
        self.finish_reason = later.finish_reason or self.finish_reason
        self.tool_calls = later.tool_calls or self.tool_calls


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerateChunk:
    """What one streamed step yields: the deltas of the choices that moved, and usage at the end."""

    choices: list[ChoiceDelta]
    usage: Optional[Usage] = None          # set on the request's last chunk only: it ends the stream
    usage_so_far: Optional[Usage] = None   # continuous_usage: on every earlier chunk


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    logprobs: Optional[list[TokenLogprob]] = None
    tool_calls: Optional[list[ToolCall]] = None
    token_ids: Optional[list[int]] = None          # return_token_ids: every sampled token, EOS included
    prompt_token_ids: Optional[list[int]] = None   # return_token_ids: the prompt as the model saw it
    prompt_logprobs: Optional[list[Optional[list[RankedLogprob]]]] = None   # vLLM's prompt_logprobs


@dataclass
class GenerateResult:
    choices: list[Choice]
    usage: Usage


# ----------------------------------------------------------------------------- embeddings

@dataclass
class EmbedRequest:
    inputs: list[Prompt]                  # strings or token-id lists
    dimensions: Optional[int] = None
    truncate_prompt_tokens: Optional[int] = None   # each input's first k tokens, its special tokens kept; -1: the model's maximum


@dataclass
class EmbedResult:
    """`embeddings` is a float32 numpy array of shape (len(inputs), dim)."""

    embeddings: Any
    prompt_tokens: int


# ----------------------------------------------------------------------------- tokenize / score

@dataclass
class TokenizeRequest:
    """vLLM's /tokenize: a plain prompt, or chat messages rendered as generation renders them."""

    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    tools: Optional[ToolSpec] = None
    add_special_tokens: bool = True
    return_token_strs: bool = False
    template: Optional[ChatTemplateOptions] = None     # with messages; None: the defaults


@dataclass
class TokenizeResult:
    tokens: list[int]
    max_model_len: int
    token_strs: Optional[list[str]] = None


@dataclass
class ScoreRequest:
    """Relevance of each (query, document) pair."""

    pairs: list[tuple[str, str]]


@dataclass
class ScoreResult:
    scores: list[float]
    prompt_tokens: int


# ----------------------------------------------------------------------------- images

@dataclass
class ImageRequest:
    prompt: str
    n: int
    width: int
    height: int
    seed: Optional[int] = None
    negative_prompt: Optional[str] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None


@dataclass
class ImageResult:
    pngs: list[bytes]


# ----------------------------------------------------------------------------- model cards

@dataclass
class ModelCard:
    """What /v1/models shows about a model beyond id/object/created/owned_by."""

    id: str
    kind: Literal["chat", "embedding", "image", "rerank"]
    created: int
    owned_by: str = "modelhub"
    capabilities: list[str] = field(default_factory=list)
    context_length: Optional[int] = None
    embedding_dimensions: Optional[int] = None
    image_sizes: Optional[list[str]] = None
    max_images: Optional[int] = None
