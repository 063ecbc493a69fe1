"""GET /version (as vLLM serves it): the version of ModelHub Serve answering."""
from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


def server_version() -> str:
    try:
        return metadata.version("modelhub-serve")
    except metadata.PackageNotFoundError:   # run from a source tree that was never pip-installed
        return "0.1.0+source"


@router.get("/version")
async def version(request: Request):
    return JSONResponse({"version": server_version()})
