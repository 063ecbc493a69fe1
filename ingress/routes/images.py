"""POST /v1/images/generations, and GET of images returned by URL."""
from __future__ import annotations

import base64

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from deployments.config import format_size
from deployments.errors import NotFoundError
from deployments.images.server import check_image_request
from ingress.pipeline import bounded, now, parse_body
from ingress.protocol.images import ImageGenerationRequest

router = APIRouter()
files_router = APIRouter()   # no credentials: the URL's HMAC signature and expiry are the capability
FILES_PATH = "/v1/images/files"


@router.post("/v1/images/generations")
async def generate_images(request: Request):
    body = await parse_body(request, ImageGenerationRequest)
    request.state.model = body.model
    state = request.app.state
    principal, ticket = request.state.principal, request.state.ticket
    entry = state.registry.get(body.model, "image", principal)
    request.state.model = entry.cfg.id   # `model` may be omitted
    sizes = entry.cfg.engine.sizes
    ireq = body.to_image_request(sizes[0], sizes)
    check_image_request(ireq, entry.cfg)
    state.log_prompt(request, body.prompt)
    result = await bounded(request, entry.client.images(ireq))
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in result.pngs]
    else:
        stored = await state.image_store.put.remote(result.pngs, principal.subject)
        base = state.public_url or str(request.base_url).rstrip("/")
        data = [{"url": f"{base}{FILES_PATH}/{token}.png?{await state.url_signer.query(token, expires)}"}
                for token, expires in stored]
    ticket.settle(entry.cfg.id, images=len(result.pngs))
    return JSONResponse({"created": now(), "data": data, "size": format_size(ireq.width, ireq.height),
                         "output_format": "png"})


@files_router.get(FILES_PATH + "/{name}")
async def image_file(name: str, request: Request, expires: str = "", signature: str = ""):
    token = name.removesuffix(".png")
    state = request.app.state
    png = None
    if state.image_store is not None and await state.url_signer.verify(token, expires, signature):
        png = await state.image_store.get.remote(token)
    if png is None:
        raise NotFoundError("This image does not exist or its URL has expired.")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
