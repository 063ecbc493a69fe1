"""Typed errors that cross the DeploymentHandle and become OpenAI error JSON at the ingress.

Each error carries its HTTP status, OpenAI `type`, `param` and `code`. They pickle by
their constructor arguments so Ray can ship them between processes.
Must not import torch, FastAPI or Ray.
"""
from __future__ import annotations


class ModelHubError(Exception):
    """Base class: an error whose message is safe to show to the client."""

    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))

    def to_dict(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


def _rebuild(cls, message, param, code, headers):
    return cls(message, param=param, code=code, headers=headers)


class InvalidRequestError(ModelHubError):
    """The request is malformed or asks for something out of range (400)."""

    status_code = 400
    type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    """A parameter OpenAI defines that this server (or this model) does not implement."""

    code = "unsupported_parameter"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(ModelHubError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(ModelHubError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class AuthenticationError(ModelHubError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class OverloadedError(ModelHubError):
    """Every queue is full; the client should retry after `Retry-After` seconds (503)."""

    status_code = 503
    type = "server_overloaded"
    code = "server_overloaded"

    def __init__(self, message: str = "The server is overloaded, please retry shortly.", *,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, retry_after_s: int = 1):
        headers = {"Retry-After": str(max(1, int(retry_after_s))), **(headers or {})}
        super().__init__(message, param=param, code=code, headers=headers)


class EngineUnavailableError(OverloadedError):
    """A model's engine stopped (a bug, or a tensor-parallel rank was lost): its replica fails its
    health check and Serve replaces it, so the client should retry (503)."""

    type = "service_unavailable"
    code = "engine_unavailable"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is over the configured size limit (413)."""

    status_code = 413
    code = "request_too_large"


class RequestTimeoutError(ModelHubError):
    """The request ran past the configured time limit; its model work was stopped (504)."""

    status_code = 504
    type = "timeout"
    code = "request_timeout"
