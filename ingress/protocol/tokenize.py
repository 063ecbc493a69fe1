"""POST /tokenize and /detokenize in vLLM's shapes: a plain prompt or chat messages in, token ids
(and optionally their strings) out; token ids in, text out.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, StrictBool, StrictInt

from deployments.types import TokenizeRequest, TokenizeResult, ToolSpec
from ingress.protocol.chat import ChatTemplateFields, Message, Tool, check_conversation_limits
from deployments.config import RequestLimits
from ingress.protocol.common import WireModel, over_limit


class TokenizeCompletionRequest(WireModel):
    model: Optional[str] = Field(None, min_length=1)   # omitted: the first chat model configured
    prompt: str
    add_special_tokens: StrictBool = True
    return_token_strs: Optional[StrictBool] = False

    def check(self) -> None:
        pass

    def check_limits(self, limits: RequestLimits) -> None:
        if len(self.prompt) > limits.max_prompt_chars:
            raise over_limit("prompt", "the prompt's length in characters", limits.max_prompt_chars,
                             "max_prompt_chars")

    def to_tokenize_request(self) -> TokenizeRequest:
        return TokenizeRequest(prompt=self.prompt, add_special_tokens=self.add_special_tokens,
                               return_token_strs=bool(self.return_token_strs))


class TokenizeChatRequest(ChatTemplateFields):
    """Messages rendered as a chat completion with the same template fields would render them."""

    model: Optional[str] = Field(None, min_length=1)
    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    add_special_tokens: StrictBool = False   # the chat template already has them, as in generation
    return_token_strs: Optional[StrictBool] = False

    def check_limits(self, limits: RequestLimits) -> None:
        check_conversation_limits(self.messages, self.tools, limits)
        self.check_template_limits(limits)

    def check(self) -> None:
        self.check_template_fields()

    def to_tokenize_request(self) -> TokenizeRequest:
        tools = ToolSpec([t.model_dump(exclude_none=True) for t in self.tools]) if self.tools else None
        return TokenizeRequest(messages=[m.model_dump(exclude_none=True) for m in self.messages], tools=tools,
                               add_special_tokens=self.add_special_tokens,
                               return_token_strs=bool(self.return_token_strs), template=self.template_options())


class TokenizeBody:
    """Picks the request model the way vLLM does: a body with `messages` is a chat request."""

    @staticmethod
    def model_validate(data: dict[str, Any]):
        model = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
        return model.model_validate(data)


class DetokenizeRequest(WireModel):
    model: Optional[str] = Field(None, min_length=1)
    tokens: list[StrictInt]


def tokenize_json(result: TokenizeResult) -> dict[str, Any]:
    return {"count": len(result.tokens), "max_model_len": result.max_model_len, "tokens": result.tokens,
            "token_strs": result.token_strs}
