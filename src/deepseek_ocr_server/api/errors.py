"""OpenAI-style error bodies and the exception handlers that produce them.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with a fitting
status; nothing a client sends can produce a 500 or a stack trace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.manager import EngineError, Overloaded
from ..models.base import InputError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client (raised anywhere in the api layer)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def human_bytes(n: int) -> str:
    """``33554432`` -> ``"32 MiB"`` (limits in error messages are read by people)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def human_pixels(n: int) -> str:
    """``64_000_000`` -> ``"64 megapixels"``."""
    mp = n / 1e6
    return f"{mp:.0f} megapixels" if mp == int(mp) else f"{mp:.1f} megapixels"


def _clean(text: str | None) -> str | None:
    """Text that always encodes as UTF-8 (a message may quote client input)."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _clean(message), "type": type, "param": _clean(param), "code": code}}


def as_api_error(exc: BaseException) -> ApiError:
    """Map engine/model exceptions to the error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineError):
        headers = {}
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return ApiError(exc.message, status=exc.status, type=exc.type, param=exc.param, code=exc.code, headers=headers)
    if isinstance(exc, InputError):
        return ApiError(str(exc), status=400, code="invalid_input")
    log.exception("internal error", exc_info=exc)
    return ApiError(f"internal error: {type(exc).__name__}", status=500, type="server_error", code="internal_error")


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    # drop pydantic's union-member tags ("str", "list[...]", "function-after[...]")
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and ("[" in p or p in {"str", "int", "float", "bool", "list", "dict"}):
            continue
        else:
            out += f".{p}" if out else str(p)
    return out or None


def validation_error(errors: Sequence[Any]) -> ApiError:
    """The first pydantic/FastAPI validation error as an OpenAI-style 400."""
    if not errors:
        return ApiError("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(
            f"We could not parse the JSON body of your request: {first.get('ctx', {}).get('error', 'invalid JSON')}",
            code="invalid_json",
        )
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return ApiError(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if param is None and first.get("type") in {"model_attributes_type", "dict_type"}:
        return ApiError("The request body must be a JSON object.", code="invalid_json")
    msg = str(first.get("msg", "invalid value"))
    value = first.get("input")
    shown = json.dumps(value)[:80] if isinstance(value, str | int | float | bool | None) else None
    text = f"Invalid value for '{param}': {msg}" + (f" (got {shown})" if shown is not None else "")
    return ApiError(text, param=param, code="invalid_value")


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return as_api_error(exc).response()

    @app.exception_handler(InputError)
    async def _input(_: Request, exc: InputError) -> JSONResponse:
        return as_api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return ApiError(detail, status=exc.status_code, type=type_, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()
