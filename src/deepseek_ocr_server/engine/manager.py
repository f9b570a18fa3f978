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
from dataclasses import dataclass, field, replace
from typing import Literal

from ..models.base import OcrModel
from . import metrics
from .errors import (
    BadRequest,
    EngineError,
    ModelUnavailable,
    Overloaded,
    QueueTimeout,
    UnknownModel,
    public_load_error,
)
from .scheduler import RequestStream, Scheduler
from .types import Event, OcrRequest

__all__ = [
    "BadRequest",
    "EngineError",
    "Loader",
    "ModelManager",
    "ModelStatus",
    "ModelUnavailable",
    "Overloaded",
    "QueueTimeout",
    "RequestStream",
    "UnknownModel",
]

log = logging.getLogger(__name__)

ModelState = Literal["idle", "loading", "ready", "failed"]


@dataclass
class ModelStatus:
    model_id: str | None
    state: ModelState
    error: str | None = None
    load_seconds: float | None = None
    running: int = 0
    queued: int = 0
    #: models whose last load failed, with the reason (they answer 503 until retried)
    failed: dict[str, str] = field(default_factory=dict)
    #: models whose files are being resolved/downloaded while the resident model keeps serving
    resolving: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model_id,
            "state": self.state,
            "error": self.error,
            "load_seconds": self.load_seconds,
            "running": self.running,
            "queued": self.queued,
            "failed": dict(self.failed),
            "resolving": list(self.resolving),
        }


Loader = Callable[[str], OcrModel]
#: resolves (maybe downloads) a model's files without touching the resident model; raises on failure
Resolver = Callable[[str], object]


class ModelManager:
    """Owns the resident model. ``loader(model_id)`` resolves assets and builds the model (blocking).

    Serving goes through a :class:`~.scheduler.Scheduler` (one worker thread, continuous batching,
    admission control, model swaps); see that module for the rules.
    """

    def __init__(
        self,
        model_ids: list[str],
        loader: Loader,
        *,
        max_running: int = 8,
        max_queued: int = 32,
        queue_timeout_s: float = 300.0,
        failed_retry_s: float = 60.0,
        prefill_slice_s: float = 0.25,
        resolver: Resolver | None = None,
    ) -> None:
        self._ids = list(model_ids)
        self._loader = loader
        self._resolver = resolver
        self._model: OcrModel | None = None
        self._status = ModelStatus(None, "idle")
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._scheduler = Scheduler(
            self._ids,
            self.load_sync,
            max_running=max_running,
            max_queued=max_queued,
            queue_timeout_s=queue_timeout_s,
            failed_retry_s=failed_retry_s,
            prefill_slice_s=prefill_slice_s,
            resolve=self.resolve_sync if resolver is not None else None,
        )

    # --- queries -------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return list(self._ids)

    def status(self) -> ModelStatus:
        """State of the resident model; ``error`` and ``failed`` carry the operator-facing reasons."""
        sch = self._scheduler
        failed = {mid: self._errors.get(mid, reason) for mid, reason in sch.failures().items()}
        return replace(self._status, running=sch.running, queued=sch.queued, failed=failed,
                       resolving=sch.resolving())

    @property
    def model(self) -> OcrModel | None:
        return self._model

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    # --- loading -------------------------------------------------------------------------------
    def load_sync(self, model_id: str) -> OcrModel:
        """Unload whatever is resident and load ``model_id`` (blocking; the scheduler's worker thread
        calls it between requests; call it yourself only when nothing is being served)."""
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
                # the client sees a short message: the reason (paths, flags to set) is for the operator
                raise ModelUnavailable(public_load_error(model_id)) from exc
            self._model = model
            self._errors.pop(model_id, None)
            seconds = time.perf_counter() - t0
            self._status = ModelStatus(model_id, "ready", load_seconds=seconds)
            metrics.MODEL_LOAD_SECONDS.labels(model=model_id).observe(seconds)
            log.info("model %s ready in %.1f s", model_id, seconds)
            return model

    def resolve_sync(self, model_id: str) -> None:
        """Resolve (maybe download) ``model_id``'s files; the resident model is not touched (blocking:
        the scheduler calls it in a thread of its own while the resident model keeps serving)."""
        assert self._resolver is not None
        try:
            self._resolver(model_id)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal for the server
            msg = f"{type(exc).__name__}: {exc}"
            log.error("resolving the files of model %s failed: %s", model_id, msg)
            self._errors[model_id] = msg
            raise ModelUnavailable(public_load_error(model_id)) from exc

    async def preload(self, model_id: str) -> None:
        """Load ``model_id`` in the background (the worker does it when idle); failures are reported by
        ``status()``, never raised."""
        if model_id not in self._ids:
            log.error("preload: unknown model %r", model_id)
            return
        self._scheduler.preload(model_id)

    # --- serving -------------------------------------------------------------------------------
    def submit(self, req: OcrRequest) -> AsyncIterator[Event]:
        """Queue ``req`` and stream its events: ``TextDelta``*, then ``Finished`` (or ``Failed`` when the
        generation broke after its first event). Call from the event loop.

        Errors, always before the first event: raised at once by ``submit`` -- UnknownModel (404, the ids
        listed), ModelUnavailable (503, the model failed to load recently), Overloaded (429,
        ``retry_after`` seconds), BadRequest (400, invalid sampling values); raised by the first
        ``__anext__`` -- QueueTimeout (503), BadRequest (400, the model refused the input), ModelUnavailable
        (503, the model failed to load while the request waited), EngineError (500).
        Closing the iterator early (``aclose()``, cancelling the awaiting task) cancels the generation.
        """
        if req.model_id not in self._ids:
            metrics.REJECTED.labels(reason="unknown_model").inc()
            raise UnknownModel(
                f"model {req.model_id!r} not found; available: {', '.join(self._ids)}", param="model"
            )
        return self._scheduler.submit(req)

    def submit_group(self, reqs: list[OcrRequest]) -> list[RequestStream]:
        """Queue the pages of one document (one request each, all for one model); one event stream per
        page, in page order. The document counts as one request against ``max_queued`` and the queue
        timeout; its pages share the running slots fairly with other requests (see the scheduler).
        Errors as for :meth:`submit`; close every stream to cancel the document."""
        model_id = reqs[0].model_id if reqs else ""
        if model_id not in self._ids:
            metrics.REJECTED.labels(reason="unknown_model").inc()
            raise UnknownModel(f"model {model_id!r} not found; available: {', '.join(self._ids)}", param="model")
        return self._scheduler.submit_group(reqs)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._scheduler.shutdown)
        self._model = None
