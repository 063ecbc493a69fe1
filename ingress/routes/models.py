"""GET /v1/models and GET /v1/models/{id} (ids may contain '/')."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ingress.protocol.models import model_json, model_list_json

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request):
    return JSONResponse(model_list_json(await request.app.state.registry.cards(request.state.principal)))


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request):
    return JSONResponse(model_json(await request.app.state.registry.card(model_id, request.state.principal)))
