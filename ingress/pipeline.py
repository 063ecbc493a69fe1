"""The one request pipeline every route uses: parse -> check -> call -> JSON or SSE.

Streams are peeked before the response starts, so an error raised before the first token
(context length, overload) still gets its real status code; a later error becomes an SSE
`data: {"error": ...}` event, which the openai client raises.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Type, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from deployments.errors import InvalidRequestError, RequestTimeoutError
from ingress.errors import request_id_of, sse_error, to_modelhub_error, validation_error

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def parse_body(request: Request, model: Type[M]) -> M:
    """The body as `model`, checked against the configured caps (limits) before any model work."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise validation_error([{"type": "json_invalid", "loc": ()}]) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    body.check_limits(request.app.state.limits)
    return body


async def bounded(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work` within the request's time limit; past it, the work is cancelled (which stops the
    model's work for it) and the client gets 504."""
    limit = request.app.state.limits.request_timeout_s
    if not limit:
        return await work
    try:
        return await asyncio.wait_for(work, limit)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"The request took longer than this server's limit of {limit:g} s.") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


async def sse_response(request: Request, chunks: AsyncIterator[Any], render: Callable[[Any], str],
                       finish: Callable[[], str]) -> StreamingResponse:
    """`render(chunk)` returns SSE text for one chunk; `finish()` the text before `data: [DONE]`.
    The stream ends with an SSE error event past the request's total time limit, or when no chunk
    came for the idle limit; either way the model's work for it stops."""
    it = chunks.__aiter__()
    clock = _StreamClock(request.app.state.limits)
    try:
        first = await clock.next(it)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await it.aclose()
        raise
    rid = request_id_of(request)

    async def body():
        try:
            if first is not None:
                yield render(first)
                while True:
                    try:
                        chunk = await clock.next(it)
                    except StopAsyncIteration:
                        break
                    yield render(chunk)
            yield finish() + "data: [DONE]\n\n"
        except Exception as exc:  # after the headers went out: report in-band
            yield sse_error(to_modelhub_error(exc, rid))
        finally:
            await it.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


class _StreamClock:
    """The next item of a stream within the idle limit and what is left of the total limit."""

    def __init__(self, limits: Any):
        self.idle = limits.stream_idle_timeout_s or None
        self.deadline = time.monotonic() + limits.request_timeout_s if limits.request_timeout_s else None

    async def next(self, it: AsyncIterator[Any]) -> Any:
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        wait = min((t for t in (self.idle, left) if t is not None), default=None)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps each chunk's await in a task
            async with asyncio.timeout(wait):
                return await it.__anext__()
        except TimeoutError:
            if left is not None and wait == left:
                raise RequestTimeoutError("The stream ran past this server's time limit for a request.") from None
            raise RequestTimeoutError(f"The stream produced nothing for {self.idle:g} s.") from None
