"""POST /tokenize and POST /detokenize (vLLM's utility endpoints), for chat models."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ingress.pipeline import bounded, parse_body
from ingress.protocol.tokenize import DetokenizeRequest, TokenizeBody, tokenize_json

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request):
    body = await parse_body(request, TokenizeBody)
    body.check()
    state = request.app.state
    entry = state.registry.get(body.model, "chat", request.state.principal)
    request.state.model = entry.cfg.id
    state.log_prompt(request, getattr(body, "messages", None) or getattr(body, "prompt", None))
    result = await bounded(request, entry.client.tokenize(body.to_tokenize_request()))
    return JSONResponse(tokenize_json(result))


@router.post("/detokenize")
async def detokenize(request: Request):
    body = await parse_body(request, DetokenizeRequest)
    entry = request.app.state.registry.get(body.model, "chat", request.state.principal)
    request.state.model = entry.cfg.id
    return JSONResponse({"prompt": await bounded(request, entry.client.detokenize(body.tokens))})
