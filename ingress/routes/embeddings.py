"""POST /v1/embeddings."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deployments.types import Usage
from ingress.pipeline import bounded, parse_body
from ingress.protocol.chat import dumps
from ingress.protocol.embeddings import EmbeddingRequest, embedding_response

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    body = await parse_body(request, EmbeddingRequest)
    body.check()
    request.state.model = body.model
    state, ticket = request.app.state, request.state.ticket
    entry = state.registry.get(body.model, "embedding", request.state.principal)
    request.state.model = entry.cfg.id   # `model` may be omitted
    await ticket.reserve(body)
    state.log_prompt(request, body.input)
    result = await bounded(request, entry.client.embed(body.to_embed_request()))
    request.state.usage = Usage(result.prompt_tokens, 0)
    ticket.settle(entry.cfg.id, embedding_tokens=result.prompt_tokens)
    payload = embedding_response(result.embeddings, entry.cfg.id, result.prompt_tokens, body.encoding_format or "float")
    return Response(dumps(payload), media_type="application/json")
