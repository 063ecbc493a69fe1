"""The ASGI middleware every HTTP request passes first: its identity, the per-client limits
(client_limit.py), the body-size limit, the 500 of last resort, and one access-log line when it ends.

The server makes every request's id (`request.state.request_id`); a client's `x-request-id` is only
echoed back and logged, never a key to server state. Never imports torch.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Optional

from deployments.errors import PayloadTooLargeError
from ingress.client_limit import ClientThrottle
from ingress.errors import error_response, to_modelhub_error

logger = logging.getLogger("ray.serve.modelhub.ingress")   # under ray.serve: Serve configures its handlers in replicas
access_logger = logging.getLogger("ray.serve.modelhub.access")
_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MAX_LOGGED = 128   # characters of a client-supplied string in the access log


class RequestContextMiddleware:
    def __init__(self, app, max_body_bytes: int, echo_request_id: bool = True,
                 throttle: Optional[ClientThrottle] = None):
        """echo_request_id: set `x-request-id` on responses (the client's, else ours). Off under Ray
        Serve, whose own middleware already echoes the client's header or one it made.
        throttle: per-client limits, checked before anything else (None: none)."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.echo_request_id = echo_request_id
        self.throttle = throttle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()
        rid = f"req_{uuid.uuid4().hex}"
        given = _header(scope, b"x-request-id")
        client_rid = given if given is not None and _SAFE_ID.fullmatch(given) else None
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        echo = (client_rid or rid).encode()
        status = 0

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                if self.echo_request_id:
                    headers.append((b"x-request-id", echo))
                message = {**message, "headers": headers}
            await send(message)

        client = refused = None
        if self.throttle is not None and self.throttle.limits(scope):
            client = self.throttle.client_of(scope)
            refused = self.throttle.admit(client)
        try:
            if refused is not None:
                await error_response(refused)(scope, receive, tracking_send)
            elif self._declares_too_much(scope):
                await error_response(self._too_large())(scope, receive, tracking_send)
            else:
                await self.app(scope, self._counting(receive), tracking_send)
        except Exception as exc:
            if status:
                logger.error("request %s failed after its response started", rid, exc_info=exc)
            else:
                await error_response(to_modelhub_error(exc, rid))(scope, receive, tracking_send)
        finally:
            if client is not None and refused is None:
                self.throttle.release(client)
            _log_access(scope, state, status or 500, time.perf_counter() - began, given)

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"The request body is larger than this server's limit of "
                                    f"{self.max_body_bytes} bytes.")

    def _declares_too_much(self, scope) -> bool:
        length = _header(scope, b"content-length")
        return length is not None and length.isascii() and length.isdigit() and int(length) > self.max_body_bytes

    def _counting(self, receive):
        """`receive` that raises once a (chunked or lying) body passes the limit, before it is all read."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self._too_large()
            return message
        return counted


def _header(scope, name: bytes) -> Optional[str]:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def _log_access(scope, state: dict[str, Any], status: int, seconds: float, client_rid: Optional[str]) -> None:
    """One JSON line: ids, route, model, status, latency and token counts. Never a prompt; strings a
    client chose are truncated, and JSON escapes their control characters."""
    route = scope.get("route")
    usage = state.get("usage")
    line = {"id": state.get("request_id"), "client_request_id": _clip(client_rid), "method": scope.get("method"),
            "route": getattr(route, "path", None) or _clip(scope.get("path")), "model": _clip(state.get("model")),
            "status": status, "latency_ms": round(seconds * 1000, 1),
            "prompt_tokens": getattr(usage, "prompt_tokens", None),
            "completion_tokens": getattr(usage, "completion_tokens", None)}
    # into the replica's log file only, not onto stderr, which Ray copies to the driver's console line
    # by line at a cost per request (profiled in bench/README.md, "Auth and rate limiting")
    access_logger.info(json.dumps(line), extra={"log_to_stderr": False})


def _clip(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    return value if len(value) <= _MAX_LOGGED else value[:_MAX_LOGGED] + "..."
