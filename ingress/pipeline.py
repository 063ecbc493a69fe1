"""The one request pipeline every route uses: parse -> check -> call -> JSON or SSE.

Streams are peeked before the response starts, so an error raised before the first token
(context length, overload) still gets its real status code; a later error becomes an SSE
`data: {"error": ...}` event, which the openai client raises.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Type, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from deployments.errors import InvalidRequestError
from ingress.errors import request_id_of, sse_error, to_modelhub_error, validation_error

M = TypeVar("M", bound=BaseModel)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def parse_body(request: Request, model: Type[M]) -> M:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise validation_error([{"type": "json_invalid", "loc": ()}]) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def json_response(body: Any, request: Request) -> JSONResponse:
    return JSONResponse(body, headers={"x-request-id": request_id_of(request)})


async def sse_response(request: Request, chunks: AsyncIterator[Any], render: Callable[[Any], str],
                       finish: Callable[[], str]) -> StreamingResponse:
    """`render(chunk)` returns SSE text for one chunk; `finish()` the text before `data: [DONE]`."""
    it = chunks.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    rid = request_id_of(request)

    async def body():
        try:
            if first is not None:
                yield render(first)
                async for chunk in it:
                    yield render(chunk)
            yield finish() + "data: [DONE]\n\n"
        except Exception as exc:  # after the headers went out: report in-band
            yield sse_error(to_modelhub_error(exc, rid))
        finally:
            await it.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**SSE_HEADERS, "x-request-id": rid})
