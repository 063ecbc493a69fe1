"""POST /v1/rerank (also /rerank and /v2/rerank, as vLLM serves it) and POST /v1/score (also /score)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ingress.pipeline import bounded, new_id, now, parse_body
from ingress.protocol.rerank import RerankRequest, ScoreTextsRequest, rerank_json, score_json
from ingress.scoring import SCORING_KINDS, score_pairs

router = APIRouter()


async def _scores(request: Request, body: RerankRequest | ScoreTextsRequest, logged: object = None):
    """Scores the body's pairs on its model within the caller's limits; returns the model's id too.
    The prompt log (off by default) gets `logged`, or the pairs."""
    state = request.app.state
    entry = state.registry.get(body.model, SCORING_KINDS, request.state.principal)
    request.state.model = entry.cfg.id
    pairs = body.pairs()
    state.log_prompt(request, pairs if logged is None else logged)
    await request.state.ticket.reserve(body)
    result = await bounded(request, score_pairs(entry, pairs))
    request.state.ticket.settle(entry.cfg.id, embedding_tokens=result.prompt_tokens)
    return entry.cfg.id, result


@router.post("/v1/rerank")
@router.post("/v2/rerank")
@router.post("/rerank")
async def rerank(request: Request):
    body = await parse_body(request, RerankRequest)
    model, result = await _scores(request, body, body.query)
    return JSONResponse(rerank_json(new_id("rerank"), model, body, result.scores, result.prompt_tokens))


@router.post("/v1/score")
@router.post("/score")
async def score(request: Request):
    body = await parse_body(request, ScoreTextsRequest)
    model, result = await _scores(request, body)
    return JSONResponse(score_json(new_id("score"), now(), model, result.scores, result.prompt_tokens))
