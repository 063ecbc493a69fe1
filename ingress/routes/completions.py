"""POST /v1/completions."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from deployments.types import ChoiceDelta, GenerateChunk
from ingress.pipeline import bounded, new_id, now, parse_body, sse_response
from ingress.protocol.chat import dumps, event_tail, usage_json
from ingress.protocol.common import prompt_logprobs_json
from ingress.protocol.completions import CompletionRequest, LogprobsAccumulator, token_ids_json

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request):
    body = await parse_body(request, CompletionRequest)
    request.state.model = body.model
    body.check()
    state, ticket = request.app.state, request.state.ticket
    entry = state.registry.get(body.model, "chat", request.state.principal)
    await ticket.reserve(body)
    greq = body.to_generate_request(request.state.request_id)
    state.log_prompt(request, body.prompt)
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": body.model,
            "system_fingerprint": None}
    if not body.stream:
        result = await bounded(request, entry.client.generate(greq))
        request.state.usage = result.usage
        ticket.settle_usage(entry.cfg.id, result.usage)
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": LogprobsAccumulator().render(c.logprobs) if c.logprobs is not None else None,
                    **token_ids_json(c.prompt_token_ids, c.token_ids),
                    **({"prompt_logprobs": prompt_logprobs_json(c.prompt_logprobs or [])}
                       if body.prompt_logprobs is not None else {})}
                   for c in result.choices]
        return JSONResponse({**head, "choices": choices, "usage": usage_json(result.usage)})
    stream = CompletionStream(head, body, request.state)

    def finish() -> str:
        ticket.settle_usage(entry.cfg.id, stream.usage)
        return stream.finish()
    return await sse_response(request, entry.client.generate_stream(greq), stream.render, finish)


class CompletionStream:
    def __init__(self, head: dict, body: CompletionRequest, state: Any):
        self.state = state   # the request's: the usage goes there for the access log
        self.prefix = dumps(head)[:-1] + ',"choices":['
        self.tail = ',"usage":null}\n\n' if body.include_usage else "}\n\n"
        self.continuous = body.include_usage and bool(body.stream_options.continuous_usage_stats)
        self.head = head
        self.include_usage = body.include_usage
        self.offsets: dict[int, LogprobsAccumulator] = {}
        self.usage = None

    def render(self, chunk: GenerateChunk) -> str:
        self.usage = self.state.usage = chunk.usage or self.usage
        tail = "]" + event_tail(chunk, self.continuous, self.tail)
        return "".join("data: " + self.prefix + dumps(self._choice(d)) + tail for d in chunk.choices)

    def _choice(self, d: ChoiceDelta) -> dict:
        logprobs = None
        if d.logprobs is not None:
            logprobs = self.offsets.setdefault(d.index, LogprobsAccumulator()).render(d.logprobs)
        return {"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason,
                **token_ids_json(d.prompt_token_ids, d.token_ids)}

    def finish(self) -> str:
        if not (self.include_usage and self.usage is not None):
            return ""
        return "data: " + dumps({**self.head, "choices": [], "usage": usage_json(self.usage)}) + "\n\n"
