"""Which model is resident, and which models failed: the engine's one record of it.

:class:`Residency` owns the resident model (the object and its id), the load state ``/health`` shows
(``idle`` / ``loading`` / ``ready`` / ``failed``), the models whose files are being resolved (with the
download progress of each file) and the models that failed to resolve or load (with the reason for the
operator and the short message clients get). The scheduler is the only writer (its worker thread loads,
its resolve threads resolve); :meth:`Residency.status` gives everybody else a snapshot.

The rules it keeps:

- ``load`` drops the resident model before building the next one (one model's weights in memory);
- a failure is recorded on the failing entry only: while another model is resident the top-level state
  stays ``ready``; it becomes ``failed`` only when nothing is resident;
- a failed entry answers 503 at once for ``failed_retry_s`` seconds, then the next request retries it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..models.base import OcrModel
from . import metrics
from .errors import ModelUnavailable, public_load_error

log = logging.getLogger(__name__)

ModelState = Literal["idle", "loading", "ready", "failed"]
#: ``report(file_name, bytes_done, bytes_total)``: how a resolver tells how far a download got
#: (``bytes_total`` None when the server did not say)
DownloadReport = Callable[[str, int, "int | None"], None]


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
    #: per model being downloaded: file name -> (bytes done, bytes total or None)
    downloads: dict[str, dict[str, tuple[int, int | None]]] = field(default_factory=dict)

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
            "downloads": {mid: _download_dict(files) for mid, files in self.downloads.items()},
        }


def _download_dict(files: dict[str, tuple[int, int | None]]) -> dict[str, object]:
    totals = [t for _, t in files.values()]
    return {
        "bytes_done": sum(d for d, _ in files.values()),
        "bytes_total": None if None in totals else sum(t for t in totals if t is not None),
        "files": {name: {"bytes_done": d, "bytes_total": t} for name, (d, t) in files.items()},
    }


@dataclass(frozen=True)
class Failure:
    reason: str  # for the operator (log, /health): exception type and message, may name paths
    message: str  # for clients (the 503 body): short, no paths
    at: float  # time.monotonic()


class Residency:
    """The resident model and the load/failure records (see the module docstring). Thread-safe."""

    def __init__(self, loader: Callable[[str], OcrModel], *, failed_retry_s: float = 60.0) -> None:
        self._loader = loader
        self.failed_retry_s = failed_retry_s
        self._lock = threading.Lock()  # guards the fields below (never held while loading)
        self._load_lock = threading.Lock()  # one load at a time
        self._model: OcrModel | None = None
        self._model_id: str | None = None  # the resident model, or the one loading / that failed
        self._state: ModelState = "idle"
        self._error: str | None = None
        self._load_seconds: float | None = None
        self._loaded_at = 0.0
        self._failures: dict[str, Failure] = {}
        self._resolved: set[str] = set()
        self._downloads: dict[str, dict[str, tuple[int, int | None]]] = {}  # keys: models being resolved

    # --- reads ---------------------------------------------------------------------------------
    @property
    def model(self) -> OcrModel | None:
        """The resident model (None while nothing is loaded, or while a load runs)."""
        return self._model

    @property
    def resident(self) -> str | None:
        """Id of the resident model, None when nothing is loaded."""
        return self._model_id if self._model is not None else None

    @property
    def loaded_at(self) -> float:
        """``time.monotonic()`` when the resident model finished loading."""
        return self._loaded_at

    def status(self, running: int = 0, queued: int = 0) -> ModelStatus:
        with self._lock:
            return ModelStatus(
                self._model_id,
                self._state,
                self._error,
                self._load_seconds,
                running,
                queued,
                failed={mid: f.reason for mid, f in self._failures.items()},
                resolving=sorted(self._downloads),
                downloads={mid: dict(files) for mid, files in self._downloads.items() if files},
            )

    def check_failed(self, model_id: str) -> None:
        """Raise :class:`ModelUnavailable` (the client's message) while ``model_id``'s last failure is
        younger than ``failed_retry_s``; an older one is forgotten (the next request retries)."""
        with self._lock:
            failure = self._failures.get(model_id)
            if failure is None:
                return
            if time.monotonic() - failure.at < self.failed_retry_s:
                metrics.REJECTED.labels(reason="model_failed").inc()
                raise ModelUnavailable(failure.message)
            del self._failures[model_id]

    def failure_message(self, model_id: str) -> str:
        with self._lock:
            failure = self._failures.get(model_id)
        return failure.message if failure else public_load_error(model_id)

    # --- resolving files (before a swap) --------------------------------------------------------
    def files_ready(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._resolved

    def begin_resolving(self, model_id: str) -> bool:
        """Mark ``model_id``'s files as being resolved; False when that is already under way."""
        with self._lock:
            if model_id in self._downloads:
                return False
            self._downloads[model_id] = {}
            if self._model is None and self._state != "loading":  # nothing serves: say what comes
                self._model_id, self._state, self._error = model_id, "loading", None
            return True

    def reporter(self, model_id: str) -> DownloadReport:
        """The ``report`` callback a resolver gets for ``model_id``'s downloads."""

        def report(name: str, done: int, total: int | None) -> None:
            with self._lock:
                files = self._downloads.get(model_id)
                if files is not None:
                    files[name] = (done, total)

        return report

    def end_resolving(self, model_id: str, failure: tuple[str, str] | None) -> None:
        """The resolve step ended: files ready (``failure`` None) or ``(reason, client message)``."""
        with self._lock:
            self._downloads.pop(model_id, None)
            if failure is None:
                self._resolved.add(model_id)
            else:
                self._record_failure_locked(model_id, *failure)
            if (
                self._model is None
                and self._state == "loading"
                and self._model_id == model_id
                and not failure
            ):
                self._state = "idle"  # files ready; the load comes next

    # --- loading --------------------------------------------------------------------------------
    def load(self, model_id: str, *, restore: str | None = None) -> OcrModel:
        """Drop the resident model and load ``model_id`` (blocking). A failure is recorded and raised as
        :class:`ModelUnavailable` with the client's message (the reason goes to the log and status).
        ``restore``: the model the caller loads again after a failure (the state says ``loading`` it,
        not ``failed``: the failure belongs to ``model_id``'s entry only)."""
        with self._load_lock:
            with self._lock:
                if self._model is not None and self._model_id == model_id and self._state == "ready":
                    return self._model
                self._model = None  # drop the old weights before loading the new ones
                self._model_id, self._state, self._error, self._load_seconds = model_id, "loading", None, None
            t0 = time.perf_counter()
            try:
                model = self._loader(model_id)
            except Exception as exc:  # noqa: BLE001 - reported, never fatal for the server
                reason = f"{type(exc).__name__}: {exc}"
                log.error("loading model %s failed: %s", model_id, reason)
                message = public_load_error(model_id)
                with self._lock:
                    self._resolved.discard(model_id)  # resolve again before the next try
                    self._record_failure_locked(model_id, reason, message)
                    if restore is not None:
                        self._model_id, self._state, self._error = restore, "loading", None
                raise ModelUnavailable(message) from exc
            seconds = time.perf_counter() - t0
            with self._lock:
                self._model = model
                self._model_id, self._state, self._error, self._load_seconds = (
                    model_id,
                    "ready",
                    None,
                    seconds,
                )
                self._loaded_at = time.monotonic()
                self._failures.pop(model_id, None)
            metrics.MODEL_LOAD_SECONDS.labels(model=model_id).observe(seconds)
            log.info("model %s ready in %.1f s", model_id, seconds)
            return model

    def unload(self) -> None:
        with self._lock:
            self._model = None
            if self._state == "ready":
                self._state = "idle"

    def _record_failure_locked(self, model_id: str, reason: str, message: str) -> None:
        self._failures[model_id] = Failure(reason, message, time.monotonic())
        if self._model is None and (self._state != "loading" or self._model_id == model_id):
            # nothing serves (nor loads): the top-level state is this failure
            self._model_id, self._state, self._error = model_id, "failed", reason
