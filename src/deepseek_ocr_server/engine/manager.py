"""ModelManager: the API layer's handle on the engine (one resident model; swap = drain -> unload -> load).

The API layer talks only to this class (``submit``, ``status``, ``model_ids``). Requests go to a
:class:`~.scheduler.Scheduler` (one worker thread, continuous batching, admission control, model swaps);
which model is resident and which ones failed is recorded once, in the scheduler's
:class:`~.residency.Residency`: ``status()`` reads it. Loading runs on the worker thread, resolving
(downloading) a model's files on a thread of its own, so the event loop keeps serving (``/health``,
``/v1/models``) while a model loads or downloads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from ..models.base import OcrModel
from . import metrics
from .errors import (
    BadRequest,
    EngineError,
    ModelUnavailable,
    Overloaded,
    QueueTimeout,
    UnknownModel,
)
from .residency import DownloadReport, ModelState, ModelStatus
from .scheduler import RequestStream, Scheduler
from .types import Event, OcrRequest

__all__ = [
    "BadRequest",
    "DownloadReport",
    "EngineError",
    "Loader",
    "ModelManager",
    "ModelState",
    "ModelStatus",
    "ModelUnavailable",
    "Overloaded",
    "QueueTimeout",
    "RequestStream",
    "Resolver",
    "UnknownModel",
]

log = logging.getLogger(__name__)

Loader = Callable[[str], OcrModel]
#: ``resolver(model_id, report)`` resolves (maybe downloads) a model's files without touching the resident
#: model, telling ``report(file, bytes_done, bytes_total)`` how far each download got; raises on failure
Resolver = Callable[[str, DownloadReport], object]


class ModelManager:
    """Owns the engine. ``loader(model_id)`` builds the model (blocking: resolves its files too unless
    a ``resolver`` does that first, while the resident model keeps serving).

    Serving goes through a :class:`~.scheduler.Scheduler`; see that module for the rules.
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
        self._scheduler = Scheduler(
            self._ids,
            loader,
            max_running=max_running,
            max_queued=max_queued,
            queue_timeout_s=queue_timeout_s,
            failed_retry_s=failed_retry_s,
            prefill_slice_s=prefill_slice_s,
            resolve=resolver,
        )

    # --- queries -------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return list(self._ids)

    def status(self) -> ModelStatus:
        """State of the resident model; ``error`` and ``failed`` carry the operator-facing reasons,
        ``downloads`` how far each file being fetched got."""
        sch = self._scheduler
        return sch.residency.status(running=sch.running, queued=sch.queued)

    @property
    def model(self) -> OcrModel | None:
        return self._scheduler.residency.model

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    # --- loading -------------------------------------------------------------------------------
    def load_sync(self, model_id: str) -> OcrModel:
        """Unload whatever is resident and load ``model_id`` (blocking; call it only when nothing is
        being served: the scheduler's worker does its own swaps). Raises ModelUnavailable on failure."""
        if model_id not in self._ids:
            raise UnknownModel(f"model {model_id!r} not found; available: {', '.join(self._ids)}", param="model")
        return self._scheduler.residency.load(model_id)

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
