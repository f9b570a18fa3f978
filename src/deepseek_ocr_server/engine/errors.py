"""Errors the engine raises to the API layer, each mapped to an HTTP status and OpenAI error type.

Re-exported by ``engine/manager.py`` (import them from there).
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of errors the API maps to HTTP statuses."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(EngineError):
    """The model cannot serve this input (``InputError`` from ``prepare``/``prefill``, prompt too long)."""

    status, type, code = 400, "invalid_request_error", None


class UnknownModel(EngineError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class ModelUnavailable(EngineError):
    status, type, code = 503, "server_error", "model_unavailable"


def public_load_error(model_id: str) -> str:
    """What a client is told about a model whose files or weights could not be loaded (the reason, with
    paths and settings, goes to the server log and to ``/health`` for the operator)."""
    return f"The model '{model_id}' is not available: it failed to load. The server log has the reason."


class Overloaded(EngineError):
    status, type, code = 429, "rate_limit_error", "server_overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeout(EngineError):
    status, type, code = 503, "server_error", "queue_timeout"
