"""Every error leaves the proxy as an RFC 9457 problem document with a machine-readable code.

The domain errors of `proxy.errors` are raised where they happen; this module alone decides
their HTTP status (`STATUS`) and headers. The handlers registered by `install_problem_handlers`
turn them, FastAPI's validation errors, plain HTTP errors and any unexpected exception into
`application/problem+json`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.settings import Settings
from proxy import errors

log = logging.getLogger("proxy")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TITLES = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


# The status of each domain error; a subclass not listed takes its nearest listed base's.
STATUS: dict[type[errors.ServiceError], int] = {
    errors.ServiceError: 500,
    errors.ImageRequired: 422,
    errors.PayloadTooLarge: 413,
    errors.UnknownImageId: 404,
    errors.UnknownMaskId: 404,
    errors.InvalidParameter: 422,
    errors.TooMuchWork: 422,
    errors.Overloaded: 503,
    errors.DeadlineExceeded: 504,
    errors.ShuttingDown: 503,
    errors.PromptError: 422,
    errors.ImageError: 422,
    errors.UnsupportedImageFormat: 415,
    errors.TritonUnavailable: 503,
    errors.TritonTimeout: 504,
    errors.TritonFailed: 502,
}
# Worth retrying after `Retry-After` seconds.
RETRY_LATER = (errors.TritonUnavailable, errors.Overloaded, errors.ShuttingDown)


def status_of(error: errors.ServiceError | type[errors.ServiceError]) -> int:
    """The HTTP status of a domain error (or error class)."""
    for cls in (error if isinstance(error, type) else type(error)).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    raise TypeError(f"{type(error).__name__} is not a ServiceError")


def problem_body(status: int, code: str, detail: str, **extensions: Any) -> dict[str, Any]:
    return {
        "type": f"/problems/{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
        **extensions,
    }


def problem_response(
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, code, detail, **extensions),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
        for error in exc.errors()
    ]


def install_problem_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(errors.ServiceError)
    async def _service_error(request: Request, exc: errors.ServiceError) -> JSONResponse:
        headers = None
        if isinstance(exc, RETRY_LATER):
            headers = {"Retry-After": str(settings.triton_retry_after_s)}
        return problem_response(status_of(exc), exc.code, exc.detail, headers, **exc.extensions)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(422, "invalid_request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal_error", "an unexpected error occurred")
