"""POST /v1/rerank (also /rerank and /v2/rerank, as vLLM serves it) and POST /v1/score (also /score)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ingress.pipeline import bounded, new_id, now, parse_body
from ingress.protocol.rerank import RerankRequest, ScoreTextsRequest, rerank_json, score_json
from ingress.scoring import SCORING_KINDS, score_pairs

router = APIRouter()


@router.post("/v1/rerank")
@router.post("/v2/rerank")
@router.post("/rerank")
async def rerank(request: Request):
    body = await parse_body(request, RerankRequest)
    state = request.app.state
    entry = state.registry.get(body.model, SCORING_KINDS, request.state.principal)
    request.state.model = entry.cfg.id
    state.log_prompt(request, body.query)
    await request.state.ticket.reserve(body)
    result = await bounded(request, score_pairs(entry, body.pairs()))
    request.state.ticket.settle(entry.cfg.id, embedding_tokens=result.prompt_tokens)
    return JSONResponse(rerank_json(new_id("rerank"), entry.cfg.id, body, result.scores, result.prompt_tokens))


@router.post("/v1/score")
@router.post("/score")
async def score(request: Request):
    body = await parse_body(request, ScoreTextsRequest)
    state = request.app.state
    entry = state.registry.get(body.model, SCORING_KINDS, request.state.principal)
    request.state.model = entry.cfg.id
    pairs = body.pairs()
    state.log_prompt(request, pairs)
    await request.state.ticket.reserve(body)
    result = await bounded(request, score_pairs(entry, pairs))
    request.state.ticket.settle(entry.cfg.id, embedding_tokens=result.prompt_tokens)
    return JSONResponse(score_json(new_id("score"), now(), entry.cfg.id, result.scores, result.prompt_tokens))
