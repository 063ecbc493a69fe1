"""POST /v1/images/generations, and GET of images returned by URL."""
from __future__ import annotations

import base64

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deployments.config import format_size
from deployments.errors import NotFoundError
from deployments.images.server import check_image_request
from ingress.pipeline import bounded, json_response, now, parse_body
from ingress.protocol.images import ImageGenerationRequest

router = APIRouter()
files_router = APIRouter()   # no auth: the unguessable token is the capability, like OpenAI's URLs
FILES_PATH = "/v1/images/files"


@router.post("/v1/images/generations")
async def generate_images(request: Request):
    body = await parse_body(request, ImageGenerationRequest)
    request.state.model = body.model
    state = request.app.state
    entry = state.registry.get(body.model, "image")
    request.state.model = entry.cfg.id   # `model` may be omitted
    sizes = entry.cfg.engine.sizes
    ireq = body.to_image_request(sizes[0], sizes)
    check_image_request(ireq, entry.cfg)
    state.log_prompt(request, body.prompt)
    result = await bounded(request, entry.client.images(ireq))
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in result.pngs]
    else:
        stored = await state.image_store.put.remote(result.pngs)
        base = state.public_url or str(request.base_url).rstrip("/")
        data = [{"url": f"{base}{FILES_PATH}/{token}.png"} for token, _ in stored]
    return json_response({"created": now(), "data": data, "size": format_size(ireq.width, ireq.height),
                          "output_format": "png"}, request)


@files_router.get(FILES_PATH + "/{name}")
async def image_file(name: str, request: Request):
    token = name.removesuffix(".png")
    store = request.app.state.image_store
    png = None if store is None else await store.get.remote(token)
    if png is None:
        raise NotFoundError("This image does not exist or its URL has expired.")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
