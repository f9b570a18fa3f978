"""Continuous-batching scheduler for the resident model.

One worker thread owns the model; torch work never runs on the event loop. Between two decode steps the
worker may admit ONE waiting request (``prepare`` + ``prefill``) into the running batch; then it runs one
``model.decode`` call for every running sequence. Finished and cancelled sequences leave at once and
release their caches. Each sequence is an :class:`~.sequence.Sequence` (its own sampler, stop strings,
budget and text stream), so its answer does not depend on what else is in the batch.

Events go to the asyncio side through ``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per
request; the caller reads them through a :class:`RequestStream`.

Admission and model choice (the rules the README documents):

- ``max_running`` sequences decode together; at most ``max_queued`` requests wait for a slot beyond
  the free ones (beyond: :class:`Overloaded`, HTTP 429 with ``Retry-After``; ``max_queued = 0``: no
  queue, a request is accepted only when a slot is free); a request that waits longer than
  ``queue_timeout_s`` for its prefill to start gets :class:`QueueTimeout`.
- One admission (prepare + vision + prefill) at a time. The worker hands ``model.prefill`` a
  ``between_layers`` callback that the model calls after every layer (the protocol's rule,
  ``models/base.py``); once the running streams have waited ``prefill_slice_s``
  since their last token, the worker runs one decode step for them right there. So a running stream
  waits at most ``prefill_slice_s`` plus one layer of the prefill (plus one preprocessing) between two
  of its tokens, however long the page and however many requests arrive; the admitted request's own
  prefill is delayed by at most one decode step per slice.
- The oldest waiting request decides which model is wanted. Requests for the resident model are admitted
  in arrival order, except that a request that arrived after a still-waiting request for ANOTHER model is
  held back (unless it arrived before the resident model finished loading). When the oldest waiting
  request wants another model, admission stops, the running sequences finish, and the worker swaps
  (unload, then load); after the swap every request for the new model that arrived before the load
  finished is admitted (batched) ahead of a swap back. So no request waits behind more than the requests
  that arrived before it plus one swap cohort, and interleaved requests for two models cost two swaps,
  not one per request.
- A document (``submit_group``: one request whose pages are separate sequences) counts as ONE request
  against ``max_queued`` and the queue timeout (which ends once its first page is admitted). Its pages
  are admitted in page order and share the running slots fairly: when a slot frees, the waiting request
  whose group has the fewest sequences running is admitted first (ties: arrival order), so a single
  image that arrives after a 100-page document gets the next free slot instead of waiting for every page.
- Before a swap the new model's files are resolved (maybe downloaded, progress in ``/health``) in a
  thread of its own while the resident model keeps serving; a failed resolve unloads nothing.
- A model that fails to resolve or load fails the requests waiting for it with :class:`ModelUnavailable`
  (503); new requests for it get the same 503 at once for ``failed_retry_s`` seconds, after which a
  request tries again. When the load itself failed after the old model was dropped, the old model is
  loaded again at once, so the failure costs its own entry only.
- Which model is resident, its load state and the failures are recorded in :attr:`Scheduler.residency`
  (``engine/residency.py``), the one place ``status()`` reads. The worker's plan is a typed action:
  :class:`Admit` (prepare + prefill one request) or :class:`Swap` (load another model).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..models.base import InputError, OcrModel, Prepared, generation_budget
from . import metrics
from .errors import BadRequest, EngineError, ModelUnavailable, Overloaded, QueueTimeout, public_load_error
from .residency import DownloadReport, Residency
from .sequence import Sequence
from .types import Event, Failed, Finished, OcrRequest, TextDelta

log = logging.getLogger(__name__)


def _drop_images(req: OcrRequest) -> None:
    """The decoded pictures are not needed after preprocessing: free them (and tell the API layer)."""
    req.images = []
    if req.release_images is not None:
        req.release_images()


class _PrefillCancelled(Exception):
    """Raised from the ``between_layers`` callback to unwind the prefill of a request whose client went away."""


_ids = itertools.count(1)


@dataclass(eq=False)
class Group:
    """The pages of one document: one request for the queue limits, fair sharing of the slots."""

    size: int
    admitted: bool = False  # a page was admitted: the queue timeout no longer applies
    cancelled: bool = False


@dataclass(eq=False)
class Job:
    """One request from submission to its last event."""

    req: OcrRequest
    loop: asyncio.AbstractEventLoop
    scheduler: Scheduler
    queue: asyncio.Queue[Event | EngineError] = field(default_factory=asyncio.Queue)
    t_submit: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    done: bool = False  # its last event was sent (or it was cancelled)
    started: bool = False  # its first event was sent
    timer: asyncio.TimerHandle | None = None
    group: Group | None = None  # set for the pages of a document (``Scheduler.submit_group``)

    @property
    def model_id(self) -> str:
        return self.req.model_id

    def send(self, item: Event | EngineError) -> None:
        """Deliver an event (from any thread). An EngineError is raised by the stream instead."""
        if isinstance(item, EngineError | Finished | Failed):
            self.done = True
        else:
            self.started = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        """The consumer went away (thread-safe, idempotent)."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self.scheduler._cancelled(self)


class RequestStream:
    """Async iterator over one request's events: TextDelta*, then Finished or Failed.

    An :class:`EngineError` that happens before the first event (queue timeout, bad input, model failed
    to load) is raised by ``__anext__``. ``aclose()``, cancelling the task that awaits it, or dropping
    the stream cancels the generation and frees its slot.
    """

    def __init__(self, job: Job) -> None:
        self._job = job
        self._closed = False

    @property
    def request_id(self) -> int:
        return self._job.id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        try:
            item = await self._job.queue.get()
        except BaseException:
            self._closed = True
            self._job.cancel()
            raise
        if isinstance(item, EngineError):
            self._closed = True
            raise item
        if isinstance(item, Finished | Failed):
            self._closed = True
        return item

    async def aclose(self) -> None:
        self._closed = True
        self._job.cancel()

    def __del__(self) -> None:
        job = getattr(self, "_job", None)
        if job is not None and not job.done:
            job.cancel()


@dataclass(eq=False)
class Running:
    job: Job
    seq: Sequence
    model_id: str


@dataclass(frozen=True, eq=False)
class Admit:
    """Planned action: prepare + prefill ``job`` into the running batch."""

    job: Job


@dataclass(frozen=True)
class Swap:
    """Planned action: unload the resident model and load ``model_id``."""

    model_id: str


Action = Admit | Swap


class Scheduler:
    """Queue + worker thread. ``loader(model_id)`` (blocking) builds a model; :attr:`residency` records
    which one is resident and which ones failed."""

    def __init__(
        self,
        model_ids: list[str],
        loader: Callable[[str], OcrModel],
        *,
        max_running: int = 8,
        max_queued: int = 32,
        queue_timeout_s: float = 300.0,
        failed_retry_s: float = 60.0,
        prefill_slice_s: float = 0.25,
        resolve: Callable[[str, DownloadReport], object] | None = None,
    ) -> None:
        if max_running < 1 or max_queued < 0 or queue_timeout_s <= 0 or prefill_slice_s < 0:
            raise ValueError(
                "max_running >= 1, max_queued >= 0, queue_timeout_s > 0 and prefill_slice_s >= 0 are required"
            )
        self.model_ids = list(model_ids)
        #: the resident model, its load state and the failed models (the one record of them)
        self.residency = Residency(loader, failed_retry_s=failed_retry_s)
        #: resolves a model's files (maybe downloading them) in a thread of its own; None: the loader does it
        self._resolve = resolve
        self.max_running = max_running
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        #: longest wait of the running streams for a decode step while a prefill runs (see module doc)
        self.prefill_slice_s = prefill_slice_s
        self._admitting = 0  # 1 while an admission runs (worker thread only)
        self._admitting_job: Job | None = None  # the job being admitted (worker thread only)
        #: perf_counter at the end of the last decode step, while sequences were left running after it
        self._gap_from: float | None = None
        self._interleaved_s = 0.0  # decode time spent inside the current admission
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()  # guarded by _cond
        self._running: list[Running] = []  # worker thread only
        self._preload: str | None = None
        self._stop = False
        self._draining = False  # shutdown began: no new requests
        self._cut: str | None = None  # end the running sequences with this message (worker thread acts)
        self._thread: threading.Thread | None = None
        self._service_ewma = 5.0  # seconds a request takes, for Retry-After
        self._num_running = 0

    # --- asyncio side ----------------------------------------------------------------------------
    def submit(self, req: OcrRequest) -> RequestStream:
        """Queue a request (call from the event loop). Raises ModelUnavailable / Overloaded / BadRequest
        at once; later errors before the first event are raised by the stream."""
        return self._enqueue([req], None)[0]

    def submit_group(self, reqs: list[OcrRequest]) -> list[RequestStream]:
        """Queue the pages of one document (all for the same model), one stream per page in order.

        The group counts as one request against ``max_queued``; it times out only while none of its
        pages has been admitted. Cancel the document by closing every stream."""
        if not reqs:
            raise BadRequest("a document needs at least one page")
        if len({r.model_id for r in reqs}) != 1:
            raise BadRequest("the pages of a document must all ask for the same model")
        return self._enqueue(reqs, Group(len(reqs)))

    @staticmethod
    def _check_request(req: OcrRequest) -> None:
        if req.max_new_tokens < 1:
            raise BadRequest(f"max_new_tokens must be >= 1, got {req.max_new_tokens}", param="max_tokens")
        try:
            req.sampling.validate()
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    def _enqueue(self, reqs: list[OcrRequest], group: Group | None) -> list[RequestStream]:
        loop = asyncio.get_running_loop()
        for req in reqs:
            self._check_request(req)
        jobs = [Job(req, loop, self, group=group) for req in reqs]
        with self._cond:
            if self._stop or self._draining:
                raise ModelUnavailable("the server is shutting down")
            self.residency.check_failed(reqs[0].model_id)
            # waiting requests that a free slot will take at once are not queued: a burst into an idle
            # server gets max_running + max_queued accepted, and max_queued = 0 means "no queue"
            free = max(0, self.max_running - self._num_running)
            queued = self._queued_locked() - free
            if queued >= self.max_queued:
                retry = self._retry_after_locked()
                metrics.REJECTED.labels(reason="overloaded").inc()
                raise Overloaded(
                    f"server busy: {max(queued, 0)} requests queued (max {self.max_queued}); retry later",
                    retry_after=retry,
                )
            self._waiting.extend(jobs)
            self._set_depth_locked()
            self._ensure_thread_locked()
            self._cond.notify_all()
        timer = loop.call_later(self.queue_timeout_s, self._timeout, jobs[0])
        for job in jobs:  # one timer per request: a document's pages share it
            job.timer = timer
        return [RequestStream(job) for job in jobs]

    def _queued_locked(self) -> int:
        """Waiting requests (a document with pages still waiting counts once)."""
        groups = {id(j.group) for j in self._waiting if j.group is not None}
        return len(groups) + sum(1 for j in self._waiting if j.group is None)

    def _set_depth_locked(self) -> None:
        metrics.QUEUE_DEPTH.set(self._queued_locked())

    def preload(self, model_id: str) -> None:
        """Load ``model_id`` when the worker is idle (no request waits or runs)."""
        with self._cond:
            self._preload = model_id
            self._ensure_thread_locked()
            self._cond.notify_all()

    def _retry_after_locked(self) -> float:
        waves = math.ceil((self._queued_locked() + 1) / self.max_running)
        return float(min(60, max(1, math.ceil(self._service_ewma * waves))))

    def _timeout(self, job: Job) -> None:
        group = job.group
        with self._cond:
            if group is None:
                if job not in self._waiting:
                    return
                expired = [job]
            else:
                if group.admitted:
                    return
                expired = [j for j in self._waiting if j.group is group]
                if not expired:
                    return
            for j in expired:
                self._waiting.remove(j)
            self._set_depth_locked()
        metrics.REJECTED.labels(reason="queue_timeout").inc()
        for j in expired:
            j.send(QueueTimeout(f"request waited more than {self.queue_timeout_s:g} s for a free slot"))

    def _cancelled(self, job: Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._set_depth_locked()
            self._cond.notify_all()
        if job.group is None or not job.group.cancelled:  # a document counts once
            if job.group is not None:
                job.group.cancelled = True
            metrics.CANCELLED.inc()

    # --- status ----------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        with self._cond:
            return self._queued_locked()

    @property
    def running(self) -> int:
        return self._num_running

    # --- resolving another model's files while the resident one serves -----------------------------
    def _swappable_locked(self, model_id: str) -> bool:
        """True when a swap to ``model_id`` may start: its files are resolved (or there is no separate
        resolve step). Otherwise starts resolving them in the background and returns False."""
        if self._resolve is None or self.residency.files_ready(model_id):
            return True
        if self.residency.begin_resolving(model_id):
            threading.Thread(target=self._resolve_files, args=(model_id,), name=f"ocr-resolve-{model_id}",
                             daemon=True).start()
        return False

    def _resolve_files(self, model_id: str) -> None:
        assert self._resolve is not None
        failure: tuple[str, str] | None = None
        try:
            self._resolve(model_id, self.residency.reporter(model_id))
        except EngineError as exc:
            failure = (exc.message, exc.message)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal for the server
            reason = f"{type(exc).__name__}: {exc}"
            log.error("resolving the files of model %s failed: %s", model_id, reason)
            failure = (reason, public_load_error(model_id))
        self.residency.end_resolving(model_id, failure)
        with self._cond:
            if failure is not None and self._preload == model_id:
                self._preload = None
            self._cond.notify_all()
        if failure is not None:  # nothing was unloaded: only the requests for this model fail
            self._fail_waiting(model_id, failure[1])

    # --- lifecycle -------------------------------------------------------------------------------
    def _ensure_thread_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="ocr-engine", daemon=True)
            self._thread.start()

    def drain(self) -> None:
        """Shutdown, first part: refuse new requests and answer the waiting ones 503; the running
        sequences go on."""
        with self._cond:
            self._draining = True
            waiting = list(self._waiting)
            self._waiting.clear()
            metrics.QUEUE_DEPTH.set(0)
            self._cond.notify_all()
        for job in waiting:
            if job.timer is not None:
                job.loop.call_soon_threadsafe(job.timer.cancel)
            job.send(ModelUnavailable("the server is shutting down"))

    def cut_running(self, message: str = "the server is shutting down") -> None:
        """Shutdown, second part: end every running sequence (and a prefill in progress) with an error
        event carrying ``message`` (status 503)."""
        with self._cond:
            self._cut = message
            self._cond.notify_all()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the worker: waiting requests get 503; running sequences are failed and released."""
        with self._cond:
            self._stop = True
            waiting = list(self._waiting)
            self._waiting.clear()
            metrics.QUEUE_DEPTH.set(0)
            self._cond.notify_all()
        for job in waiting:
            job.send(ModelUnavailable("the server is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- worker ----------------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._running and not self._waiting and not self._wants_preload():
                    self._cond.wait()
                if self._stop:
                    break
                cut, self._cut = self._cut, None
                action = None if cut else self._plan_locked()
            if cut:
                self._fail_running(cut, status=503)
                continue
            try:
                if isinstance(action, Swap):
                    self._swap(action.model_id)
                elif isinstance(action, Admit):
                    self._admit(action.job)
                if self._running:
                    self._step()
                elif action is None:
                    with self._cond:  # nothing to do right now (e.g. every waiting job was cancelled)
                        if not self._stop and not self._running and self._plan_peek_locked() is None:
                            self._cond.wait(0.5)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("engine worker iteration failed")
                self._fail_running("internal error in the engine worker")
        self._fail_running("the server is shutting down")
        self.residency.unload()

    def _wants_preload(self) -> bool:
        return self._preload is not None and self._preload != self.residency.resident

    def _plan_peek_locked(self) -> Action | None:
        return self._choose_locked(pop=False)

    def _plan_locked(self) -> Action | None:
        return self._choose_locked(pop=True)

    def _choose_locked(self, *, pop: bool) -> Action | None:
        resident = self.residency.resident
        loaded_at = self.residency.loaded_at
        other: Job | None = None  # the oldest waiting job for another model whose files are ready
        best: Job | None = None
        best_load = 0
        seen: set[int] = set()
        running_per_group = collections.Counter(id(r.job.group) for r in self._running if r.job.group is not None)
        for job in self._waiting:
            if job.cancelled:
                continue
            if job.model_id != resident:
                # a model whose files are still being resolved does not hold anyone back yet
                if other is None and self._swappable_locked(job.model_id):
                    other = job
                continue
            if other is not None and job.t_submit > other.t_submit and job.t_submit > loaded_at:
                continue  # arrived after a request for another model: held back
            if len(self._running) >= self.max_running:
                return None
            if job.group is not None:
                if id(job.group) in seen:
                    continue  # a document's pages go in page order: only its first waiting page competes
                seen.add(id(job.group))
            load = running_per_group[id(job.group)] if job.group is not None else 0
            if best is None or load < best_load:
                best, best_load = job, load
            if load == 0:
                break  # nothing can beat an idle request that arrived first
        if best is not None:
            if pop:
                self._waiting.remove(best)
                if best.group is not None:
                    best.group.admitted = True
                self._set_depth_locked()
            return Admit(best)
        if other is not None:
            if self._running:
                return None  # drain first
            return Swap(other.model_id)
        if not self._running and not self._waiting and self._wants_preload():
            target = self._preload
            assert target is not None
            if not self._swappable_locked(target):
                return None  # its files are being resolved (maybe downloaded)
            if pop:
                self._preload = None
            return Swap(target)
        return None

    def _swap(self, model_id: str) -> None:
        previous = self.residency.resident
        if previous == model_id:
            previous = None
        try:
            # unloads the old model first; records state and failure
            self.residency.load(model_id, restore=previous)
        except EngineError as exc:
            self._fail_waiting(model_id, str(exc))
            if previous is not None:
                # the failure belongs to the failing entry only: the model that served before serves again
                log.warning("reloading model %s after model %s failed to load", previous, model_id)
                try:
                    self.residency.load(previous)
                except EngineError as again:
                    self._fail_waiting(previous, str(again))
                    return
            else:
                return
        metrics.SWAPS.inc()

    def _fail_waiting(self, model_id: str, message: str) -> None:
        """Answer every request waiting for ``model_id`` with ModelUnavailable(``message``)."""
        log.error("model %s unavailable: %s", model_id, message)
        with self._cond:
            failed = [j for j in self._waiting if j.model_id == model_id]
            for job in failed:
                self._waiting.remove(job)
            self._set_depth_locked()
        for job in failed:
            if job.timer is not None:
                job.loop.call_soon_threadsafe(job.timer.cancel)
            job.send(ModelUnavailable(message))

    def _admit(self, job: Job) -> None:
        if job.timer is not None:
            job.loop.call_soon_threadsafe(job.timer.cancel)
        if job.cancelled:
            return
        model = self.residency.model
        assert model is not None and self.residency.resident == job.model_id
        metrics.QUEUE_WAIT.observe(time.monotonic() - job.t_submit)
        self._admitting = 1
        self._admitting_job = job
        try:
            self._admit_with(job, model)
        finally:
            self._admitting = 0
            self._admitting_job = None
            self._set_running(len(self._running))

    def _admit_with(self, job: Job, model: OcrModel) -> None:
        req = job.req
        self._set_running(len(self._running) + 1)
        seq: Sequence | None = None
        t0 = time.perf_counter()
        self._interleaved_s = 0.0
        try:
            prepared = self._prepare_while_serving(job, model)
            budget = generation_budget(prepared.num_prompt_tokens, req.max_new_tokens, model.max_context)
            seq = Sequence(model, prepared, req.sampling, budget, req.stop)
            if job.cancelled:
                raise _PrefillCancelled
            logits, seq.cache = model.prefill(prepared, seq.max_new_tokens, self._decode_during_prefill)
        except _PrefillCancelled:
            if seq is not None:
                seq.release()
            if not job.cancelled:  # the server is shutting down: tell the client
                job.send(ModelUnavailable(self._cut or "the server is shutting down"))
            log.debug("request %s cancelled during its prefill", job.id)
            return
        except InputError as exc:  # (the running count is restored by _admit)
            if seq is not None:
                seq.release()
            job.send(BadRequest(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("prefill failed for request %s", job.id)
            if seq is not None:
                seq.release()
            job.send(EngineError(f"internal error while reading the input ({type(exc).__name__})"))
            return
        metrics.PREFILL_SECONDS.observe(time.perf_counter() - t0 - self._interleaved_s)
        metrics.PROMPT_TOKENS.labels(model=job.model_id).inc(prepared.num_prompt_tokens)
        run = Running(job, seq, job.model_id)
        self._running.append(run)
        self._accept(run, logits, first=True)
        self._sweep()

    def _prepare_while_serving(self, job: Job, model: OcrModel) -> Prepared:
        """``model.prepare`` (tokenizing, image preprocessing) of an admission.

        With nothing running it runs right here. With streams running it runs in a short-lived helper
        thread while the streams keep getting decode steps here, so a long prompt or a big image never
        stalls them. The thread is started per admission and ends with it on purpose: a thread that runs
        torch ops gets an OpenMP thread team of its own, and while a second team stays alive the OpenMP
        runtime counts more threads than cores and stops spin-waiting between parallel regions; a
        persistent pool thread made every later decode step ~30 % slower (one stream on 2 cores: 23 ->
        16 tok/s). A finished thread takes its team with it."""
        req = job.req

        def work() -> Prepared:
            prepared = model.prepare(req.text, req.images, req.options, req.system)
            if req.answer_prefix:
                prepared = model.continue_answer(prepared, req.answer_prefix)
            return prepared

        if not self._running:
            try:
                return work()
            finally:
                _drop_images(req)

        fut: concurrent.futures.Future[Prepared] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(work())
            except BaseException as exc:  # noqa: BLE001 - handed to the worker thread
                fut.set_exception(exc)
            finally:
                _drop_images(req)

        threading.Thread(target=run, name="ocr-prepare", daemon=True).start()
        while True:
            # the same rule as inside a prefill: a decode step once the streams waited prefill_slice_s
            wait = 0.05
            if self._running and self._gap_from is not None:
                wait = max(0.0, self.prefill_slice_s - (time.perf_counter() - self._gap_from))
            if concurrent.futures.wait([fut], timeout=wait).done:
                return fut.result()
            if job.cancelled:
                raise _PrefillCancelled
            if self._running and self._gap_from is not None:
                self._step()

    def _decode_during_prefill(self) -> None:
        """The ``between_layers`` callback of an admission's prefill: stop at once when the admitted request was cancelled;
        else one decode step for the running streams once they have waited ``prefill_slice_s`` since
        their last one."""
        job = self._admitting_job
        if job is not None and (job.cancelled or self._cut):
            raise _PrefillCancelled
        if self._gap_from is None or time.perf_counter() - self._gap_from < self.prefill_slice_s:
            return
        t0 = time.perf_counter()
        self._step()
        self._interleaved_s += time.perf_counter() - t0

    def _step(self) -> None:
        self._sweep()
        if not self._running:
            self._gap_from = None
            return
        model = self.residency.model
        assert model is not None
        batch = list(self._running)
        metrics.BATCH_SIZE.observe(len(batch))
        t0 = time.perf_counter()
        if self._gap_from is not None:
            metrics.STEP_GAP.observe(t0 - self._gap_from)
        try:
            logits = model.decode([r.seq.last_token for r in batch], [r.seq.cache for r in batch])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001
            log.exception("decode step failed")
            self._fail_running(f"internal error while generating ({type(exc).__name__})")
            return
        label = str(len(batch))
        metrics.DECODE_SECONDS.labels(batch=label).inc(time.perf_counter() - t0)
        metrics.DECODE_STEPS.labels(batch=label).inc()
        for row, run in zip(logits, batch, strict=True):
            self._accept(run, row, first=False)
        self._sweep()
        self._gap_from = time.perf_counter() if self._running else None

    def _accept(self, run: Running, logits: object, *, first: bool) -> None:
        job, seq = run.job, run.seq
        step = seq.accept_logits(logits)  # type: ignore[arg-type]
        metrics.GENERATED_TOKENS.labels(model=run.model_id).inc()
        if first:
            metrics.TTFT.observe(time.monotonic() - job.t_submit)
        if job.cancelled:
            return
        if (step.text or first) and not step.finished:
            # the first token always makes an event (maybe empty text): the API can start its response
            # as soon as generation has started, not when the first visible character appears
            job.send(TextDelta(step.text))
        elif step.finished:
            # release and account BEFORE the last event, so that a client that saw Finished also sees
            # the slot, the cache and the metrics updated
            seq.release()
            self._set_running(sum(1 for r in self._running if not (r.seq.finished or r.job.cancelled)))
            elapsed = time.monotonic() - job.t_submit
            metrics.LATENCY.observe(elapsed)
            self._service_ewma = 0.8 * self._service_ewma + 0.2 * elapsed
            if step.text:
                job.send(TextDelta(step.text))
            assert seq.finish_reason is not None
            job.send(Finished(seq.finish_reason, seq.num_prompt_tokens, seq.num_generated, seq.text))

    def _sweep(self) -> None:
        """Remove finished and cancelled sequences, releasing their caches."""
        keep = []
        for run in self._running:
            if run.seq.finished or run.job.cancelled:
                run.seq.release()
            else:
                keep.append(run)
        self._running = keep
        self._set_running(len(keep) + self._admitting)

    def _fail_running(self, message: str, status: int = 500) -> None:
        self._gap_from = None
        for run in self._running:
            run.seq.release()
            if not run.job.done and not run.job.cancelled:
                if run.job.started:
                    run.job.send(Failed(message, status=status))
                elif status == 503:
                    run.job.send(ModelUnavailable(message))
                else:
                    run.job.send(EngineError(message))
        self._running = []
        self._set_running(0)

    def _set_running(self, n: int) -> None:
        self._num_running = n
        metrics.RUNNING.set(n)
