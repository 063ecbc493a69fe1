"""POST /v1/chat/completions."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from deployments.types import Choice, ChoiceDelta, GenerateChunk, GenerateResult
from ingress.pipeline import bounded, new_id, now, parse_body, sse_response
from ingress.protocol.chat import ChatCompletionRequest, choice_json, delta_events, dumps, event_tail, usage_json
from ingress.protocol.common import prompt_logprobs_json

router = APIRouter()
FINGERPRINT = "fp_modelhub"


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await parse_body(request, ChatCompletionRequest)
    request.state.model = body.model
    body.check()
    state, ticket = request.app.state, request.state.ticket
    entry = state.registry.get(body.model, "chat", request.state.principal)
    await ticket.reserve(body)
    greq = body.to_generate_request(request.state.request_id)
    state.log_prompt(request, body.messages)
    head = {"id": new_id("chatcmpl"), "created": now(), "model": body.model, "system_fingerprint": FINGERPRINT}
    if not body.stream:
        result = await bounded(request, entry.client.generate(greq))
        request.state.usage = result.usage
        ticket.settle_usage(entry.cfg.id, result.usage)
        return JSONResponse({**head, "object": "chat.completion",
                             "choices": [choice_json(c, body.single_tool_call) for c in result.choices],
                             "usage": usage_json(result.usage), **_prompt_fields(body, result)})
    stream = ChatStream(head, body, request.state)

    def finish() -> str:
        ticket.settle_usage(entry.cfg.id, stream.usage)
        return stream.finish()
    return await sse_response(request, entry.client.generate_stream(greq), stream.render, finish)


def _prompt_fields(body: ChatCompletionRequest, result: GenerateResult) -> dict[str, Any]:
    """vLLM's return_token_ids and prompt_logprobs: the rendered conversation's ids and logprobs, once
    per response (every choice shares the one prompt)."""
    first = result.choices[0] if result.choices else Choice(0, "", "stop")
    out: dict[str, Any] = {}
    if body.return_token_ids:
        out["prompt_token_ids"] = first.prompt_token_ids
    if body.prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs_json(first.prompt_logprobs or [])
    return out


class ChatStream:
    """Renders GenerateChunks as chat.completion.chunk events, one choice per event."""

    def __init__(self, head: dict, body: ChatCompletionRequest, state: Any):
        self.state = state   # the request's: the usage goes there for the access log
        self.prefix = dumps({**head, "object": "chat.completion.chunk"})[:-1] + ',"choices":['
        self.tail = ',"usage":null}\n\n' if body.include_usage else "}\n\n"
        self.continuous = body.include_usage and bool(body.stream_options.continuous_usage_stats)
        self.head = head
        self.include_usage = body.include_usage
        self.with_logprobs = bool(body.logprobs)
        self.single_tool_call = body.single_tool_call
        self.started: set[int] = set()
        self.prompt_ids_sent = False
        self.usage = None

    def render(self, chunk: GenerateChunk) -> str:
        parts = []
        tail = event_tail(chunk, self.continuous, self.tail)
        for d in chunk.choices:
            first = d.index not in self.started
            self.started.add(d.index)
            for event in delta_events(d, first, self.with_logprobs, self.single_tool_call):
                parts.append("data: " + self.prefix + dumps(event) + "]" + self._top_level(d) + tail)
        self.usage = self.state.usage = chunk.usage or self.usage
        return "".join(parts)

    def _top_level(self, d: ChoiceDelta) -> str:
        """vLLM's return_token_ids: the prompt's ids go on the stream's first event, and only there."""
        if d.prompt_token_ids is None or self.prompt_ids_sent:
            return ""
        self.prompt_ids_sent = True
        return ',"prompt_token_ids":' + dumps(d.prompt_token_ids)

    def finish(self) -> str:
        if not (self.include_usage and self.usage is not None):
            return ""
        return "data: " + dumps({**self.head, "object": "chat.completion.chunk", "choices": [],
                                 "usage": usage_json(self.usage)}) + "\n\n"
