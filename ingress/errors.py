"""The one place exceptions become OpenAI error JSON (or an SSE error event).

Typed ModelHubErrors keep their status, type, param and code. Pydantic validation failures
become 400s named like the real API's (`param`, `invalid_type`, `decimal_above_max_value`, ...).
Anything else is a bug: 500 with the request id, the traceback in the log, no internals in the body.
"""
from __future__ import annotations

import logging
import reprlib
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import EngineUnavailableError, InvalidRequestError, ModelHubError, OverloadedError

logger = logging.getLogger("ray.serve.modelhub.ingress")   # under ray.serve: Serve configures its handlers in replicas


def to_modelhub_error(exc: BaseException, request_id: str) -> ModelHubError:
    """Maps any exception (Ray-wrapped or not) to the error the client should see."""
    exc = _unwrap(exc)
    if isinstance(exc, ModelHubError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(exc.errors())
    typed = transport_error(exc)
    if typed is not None:
        return typed
    logger.error("request %s failed with an unexpected error", request_id, exc_info=exc)
    return ModelHubError(f"The server had an error while processing your request. Request id: {request_id}.")


def transport_error(exc: BaseException) -> Optional[ModelHubError]:
    """The typed error for what a DeploymentHandle call raises when the model is busy, starting or
    lost (Ray's classes, matched by name: no import of Ray here); None for anything else."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "BackPressureError" in names:
        return OverloadedError("Too many requests are queued for this model; retry shortly.")
    if names & {"DeploymentUnavailableError", "ReplicaUnavailableError"}:
        return OverloadedError("The model is starting or unavailable; retry shortly.", retry_after_s=5)
    if names & _REPLICA_LOST:
        return EngineUnavailableError("The model's replica stopped while serving this request; Serve is replacing "
                                      "it. Retry shortly.", retry_after_s=5)
    return None


# What a handle call raises when the replica (or its node) died under it: busy-retry, not a bug.
_REPLICA_LOST = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
                 "ObjectLostError", "OwnerDiedError"}


def _unwrap(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)   # ray.exceptions.RayTaskError carries the replica's exception
    if isinstance(cause, BaseException):
        return cause
    return exc


def error_response(err: ModelHubError) -> JSONResponse:
    return JSONResponse({"error": err.to_dict()}, status_code=err.status_code, headers=err.headers)


def sse_error(err: ModelHubError) -> str:
    from ingress.protocol.chat import dumps
    return f"data: {dumps({'error': err.to_dict()})}\n\n"


# ----------------------------------------------------------------------------- validation

_RANGE_CODES = {
    ("less_than_equal", True): "decimal_above_max_value", ("less_than_equal", False): "integer_above_max_value",
    ("less_than", True): "decimal_above_max_value", ("less_than", False): "integer_above_max_value",
    ("greater_than_equal", True): "decimal_below_min_value", ("greater_than_equal", False): "integer_below_min_value",
    ("greater_than", True): "decimal_below_min_value", ("greater_than", False): "integer_below_min_value",
}


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """The first pydantic error, phrased the way the OpenAI API phrases it."""
    err = _most_specific(errors)
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = _param(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param,
                                   code="missing_required_parameter")
    if kind == "json_invalid" or not loc:
        return InvalidRequestError("We could not parse the JSON body of your request. (HINT: This likely means you "
                                   "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                                   "but what was sent was not valid JSON.)", code="invalid_json")
    ctx = err.get("ctx") or {}
    bound = next(iter(ctx.values()), None)
    code = _RANGE_CODES.get((kind, isinstance(bound, float)))
    if code is not None:
        direction = ("<" if "above" in code else ">") + ("=" if kind.endswith("_equal") else "")   # gt=0: "> 0"
        return InvalidRequestError(f"Invalid '{param}': value out of range. Expected a value {direction} {bound}, "
                                   f"but got {_short(err.get('input'))} instead.", param=param, code=code)
    if kind.endswith("_type") or kind in ("union_tag_invalid", "model_type", "model_attributes_type"):
        return InvalidRequestError(f"Invalid type for '{param}': {err.get('msg', 'wrong type')}.", param=param,
                                   code="invalid_type")
    return InvalidRequestError(f"Invalid value for '{param}': {err.get('msg', 'invalid value')}.", param=param,
                               code="invalid_value")


def _most_specific(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Union validation reports one error per branch; prefer a value error over type mismatches."""
    for e in errors:
        if e.get("type") in ("extra_forbidden", "missing", "json_invalid"):
            return e
    for e in errors:
        if not e.get("type", "").endswith("_type"):
            return e
    return errors[0]


def _param(loc: list) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in str(p) or str(p) in ("str", "int", "float", "bool") or str(p).startswith("function-"):
            continue   # pydantic union-branch labels (never a field such as `stream_options`)
        else:
            out += ("." if out else "") + str(p)
    return out or "body"


def _short(value: Any) -> str:
    text = reprlib.repr(value)   # bounded in depth and length, whatever the client sent
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------- registration

def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ModelHubError)
    async def _typed(request: Request, exc: ModelHubError):
        rid = request_id_of(request)
        return error_response(to_modelhub_error(exc, rid))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        err = ModelHubError(str(exc.detail))
        err.status_code = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(err)


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "unknown"
