"""ModelManager: exactly one resident model; swap = drain -> unload -> load.

The API layer talks only to this class (``submit``, ``status``, ``model_ids``). Loading runs in a worker
thread so the event loop keeps serving (``/health``, ``/v1/models``) while a model loads or downloads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from ..models.base import OcrModel
from .types import Event, OcrRequest

log = logging.getLogger(__name__)

ModelState = Literal["idle", "loading", "ready", "failed"]


class EngineError(Exception):
    """Base of errors the API maps to HTTP statuses."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class UnknownModel(EngineError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class ModelUnavailable(EngineError):
    status, type, code = 503, "server_error", "model_unavailable"


class Overloaded(EngineError):
    status, type, code = 429, "rate_limit_error", "server_overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeout(EngineError):
    status, type, code = 503, "server_error", "queue_timeout"


@dataclass
class ModelStatus:
    model_id: str | None
    state: ModelState
    error: str | None = None
    load_seconds: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model_id, "state": self.state, "error": self.error, "load_seconds": self.load_seconds}


Loader = Callable[[str], OcrModel]


class ModelManager:
    """Owns the resident model. ``loader(model_id)`` resolves assets and builds the model (blocking)."""

    def __init__(self, model_ids: list[str], loader: Loader) -> None:
        self._ids = list(model_ids)
        self._loader = loader
        self._model: OcrModel | None = None
        self._status = ModelStatus(None, "idle")
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    # --- queries -------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return list(self._ids)

    def status(self) -> ModelStatus:
        return self._status

    @property
    def model(self) -> OcrModel | None:
        return self._model

    # --- loading -------------------------------------------------------------------------------
    def load_sync(self, model_id: str) -> OcrModel:
        """Unload whatever is resident and load ``model_id`` (blocking; call from a worker thread)."""
        if model_id not in self._ids:
            raise UnknownModel(f"model {model_id!r} not found; available: {', '.join(self._ids)}", param="model")
        with self._lock:
            if self._model is not None and self._status.model_id == model_id and self._status.state == "ready":
                return self._model
            self._model = None  # drop the old weights before loading the new ones
            self._status = ModelStatus(model_id, "loading")
            t0 = time.perf_counter()
            try:
                model = self._loader(model_id)
            except Exception as exc:  # noqa: BLE001 - reported, never fatal for the server
                msg = f"{type(exc).__name__}: {exc}"
                log.error("loading model %s failed: %s", model_id, msg)
                self._errors[model_id] = msg
                self._status = ModelStatus(model_id, "failed", msg)
                raise ModelUnavailable(f"model {model_id!r} failed to load: {msg}") from exc
            self._model = model
            self._errors.pop(model_id, None)
            self._status = ModelStatus(model_id, "ready", load_seconds=time.perf_counter() - t0)
            log.info("model %s ready in %.1f s", model_id, self._status.load_seconds)
            return model

    async def preload(self, model_id: str) -> None:
        """Start loading in the background; failures are reported by ``status()``, never raised."""

        async def _run() -> None:
            try:
                await asyncio.to_thread(self.load_sync, model_id)
            except EngineError:
                pass

        self._preload_task = asyncio.get_running_loop().create_task(_run())

    # --- serving -------------------------------------------------------------------------------
    def submit(self, req: OcrRequest) -> AsyncIterator[Event]:
        """Queue ``req`` and stream its events. Raises EngineError subclasses (404/429/503) before the
        first event. Closing the iterator early cancels the generation.

        Implemented by the scheduler (engine issue)."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        self._model = None
