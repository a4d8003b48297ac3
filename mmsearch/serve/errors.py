"""Every error the API returns is a 4xx (or 503) with one line of JSON: {"error": "..."}; never a traceback."""
from __future__ import annotations

import logging

from mmsearch.errors import EmptyIndexError, MediaError, MmsearchError, QueryError

log = logging.getLogger("mmsearch.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(message: str) -> dict:
    return {"error": " ".join(str(message).split())}  # one line, whatever the source said


def status_of(exc: MmsearchError) -> int:
    if isinstance(exc, (QueryError, MediaError)):
        return 400
    if isinstance(exc, EmptyIndexError):
        return 409
    return 503  # the server cannot do it (a model that will not load, ...): not the request's fault


def install_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def reply(status, message, headers=None):
        return JSONResponse(error_body(message), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return reply(exc.status, exc.message)

    @app.exception_handler(MmsearchError)
    async def _lib(request, exc: MmsearchError):
        return reply(status_of(exc), str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.url.path} (see /openapi.json)"
        return reply(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path", "form"))
        return reply(400, f"{where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return reply(500, "internal error (details in the server log)")
