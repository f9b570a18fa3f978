"""Wire settings -> assets -> models -> ModelManager -> FastAPI app, and run uvicorn.

The active model is preloaded in the background: the socket is bound and ``/health`` answers
(``loading`` / ``ready`` / ``failed`` with the reason) whatever happens to the model. Ctrl-C and SIGTERM
stop the server gracefully and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

from .config import Settings

log = logging.getLogger("deepseek_ocr_server")


def build_loader(settings: Settings, *, log_plan: bool = True) -> Callable[[str], object]:
    """``loader(model_id)`` for the ModelManager: resolve (maybe download) assets, then load the model
    with the model's effective device/dtype/quantize (blocking; the manager calls it in a thread).
    ``log_plan``: log the CPU class and precision plan first (off when a resolver does it)."""

    def load(model_id: str) -> object:
        from .assets import resolve_model_files
        from .models import load_model

        entry = settings.entry(model_id)
        inf = settings.inference_for(model_id)
        if log_plan:
            log_precision(inf.device, inf.effective_dtype, inf.quantize)
        files = resolve_model_files(settings, model_id)
        log.info(
            "loading %s (kind %s) from %s on %s/%s%s",
            model_id, entry.kind, files.weights, inf.device, inf.effective_dtype,
            f", quantize={inf.quantize}" if inf.quantize else "",
        )
        return load_model(
            entry.kind, files, device=inf.torch_device(), dtype=inf.torch_dtype(), quantize=inf.quantize
        )

    return load


def log_precision(device: str, dtype: str, quantize: str | None) -> None:
    """The CPU class in one line (also the ``ocr_cpu_info`` metric), the precision each phase will run
    in, and a one-line warning when an explicit choice is the slow one on this CPU."""
    from .cpu import cpu_info, detect
    from .engine.metrics import publish_cpu_info
    from .models.precision import choose_precision, slow_choice_warning

    plan = choose_precision(device, None if dtype == "auto" else dtype)
    if device == "cpu":
        cpu = detect()
        log.info("%s", cpu.summary())
        if plan.widened:  # the plan the package's multi-row kernel serves
            from .models.cpukernels import status

            log.info("cpu kernels: %s", status())
        publish_cpu_info(cpu_info(), plan.as_dict())
        warning = slow_choice_warning(cpu.cpu_class, None if dtype == "auto" else dtype, quantize, device)
        if warning:
            log.warning("%s", warning)
    log.info("precision: %s", plan.summary())


def build_resolver(settings: Settings) -> Callable[..., object]:
    """``resolver(model_id, report)`` for the ModelManager: find (maybe download) the files of a model
    without touching the resident one, so that a broken or absent entry never evicts it; ``report``
    hears the download progress (``/health`` shows it). Logs the CPU class and the precision plan first:
    it is the first step of every load."""

    def resolve(model_id: str, report: Callable[[str, int, int | None], None] | None = None) -> object:
        from .assets import resolve_model_files

        inf = settings.inference_for(model_id)
        log_precision(inf.device, inf.effective_dtype, inf.quantize)
        return resolve_model_files(settings, model_id, report=report)

    return resolve


def build_app(settings: Settings):  # -> (FastAPI, ModelManager)
    from .api.app import create_app
    from .engine.manager import ModelManager

    srv = settings.server
    manager = ModelManager(
        list(settings.models),
        build_loader(settings, log_plan=False),
        max_running=srv.max_running,
        max_queued=srv.max_queued,
        queue_timeout_s=srv.queue_timeout_s,
        prefill_slice_s=srv.prefill_slice_s,
        resolver=build_resolver(settings),
    )
    app = create_app(manager, settings)
    return app, manager


def run(settings: Settings) -> int:
    """Serve until Ctrl-C / SIGTERM. Returns the process exit status."""
    import uvicorn

    inf = settings.inference_for(settings.active)
    log.info("config file: %s", settings.config_path)
    from .assets import describe_hub

    log.info("model cache: %s; downloads: %s", settings.model_dir(settings.active).parent, describe_hub())
    log.info(
        "active model: %s (%s); models: %s", settings.active, settings.entry(settings.active).kind,
        ", ".join(settings.models),
    )
    log.info("device: %s, dtype: %s%s", inf.device, inf.effective_dtype,
             f", quantize: {inf.quantize}" if inf.quantize else "")

    if settings.server.api_key:
        log.info("authentication: an API key is required on /v1/* (Authorization: Bearer <key>)")
    else:
        log.warning(
            "authentication: NONE - anyone who can reach %s:%s can use the API (set --api-key or %s)",
            settings.server.host, settings.server.port, "DEEPSEEK_OCR_API_KEY",
        )
    app, manager = build_app(settings)
    srv = settings.server
    config = uvicorn.Config(
        app,
        host=srv.host,
        port=srv.port,
        log_config=None,  # use our logging setup (root handler)
        log_level=logging.getLogger().level or logging.INFO,
        # a backstop: the drain below ends every stream with an error event before this runs out
        timeout_graceful_shutdown=int(srv.shutdown_drain_s) + 10,
        http=guarded_protocol(srv.header_timeout_s, srv.max_connections),
    )
    server = uvicorn.Server(config)
    stop_signals: list[int] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        # Installed before uvicorn's own handlers: uvicorn re-raises a captured signal after its graceful
        # shutdown, which lands here instead of killing the process with the default action.
        stop_signals.append(sig)
        server.should_exit = True

    # Bind before anything else so that a busy port fails fast, before a model load/download starts.
    try:
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged the OSError
        log.error("cannot listen on %s:%s (port in use? try --port)", settings.server.host, settings.server.port)
        return 1
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    async def drain_on_exit() -> None:
        """Graceful shutdown: once uvicorn stops accepting (SIGTERM, Ctrl-C), waiting requests get 503,
        running ones get ``shutdown_drain_s`` to finish, then end with an error event."""
        while not server.should_exit:
            await asyncio.sleep(0.1)
        running = manager.status().running
        log.info("shutting down: %d running request(s) get up to %g s to finish", running, srv.shutdown_drain_s)
        manager.scheduler.drain()
        deadline = asyncio.get_running_loop().time() + srv.shutdown_drain_s
        while manager.status().running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if manager.status().running:
            log.warning("shutting down: ending %d request(s) still running", manager.status().running)
            manager.scheduler.cut_running("the server is shutting down")

    async def serve() -> None:
        await manager.preload(settings.active)
        drainer = asyncio.ensure_future(drain_on_exit())
        try:
            await server.serve(sockets=[sock])
        finally:
            drainer.cancel()
            if manager.status().state == "loading":
                _exit_now(0 if server.started or stop_signals else 1)
            await manager.shutdown()

    try:
        asyncio.run(serve())
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
    code = 0 if server.started or stop_signals else 1
    log.info("stopped")
    return code


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol with two guards it lacks: a connection that has not completed a request's
    headers within ``header_timeout_s`` (of opening, or of the previous response on a keep-alive
    connection) is closed (slowloris), and a connection beyond ``max_connections`` open ones is closed
    at once. uvicorn's own keep-alive timeout does not cover the second case: any byte received
    cancels it, so a client dripping one header byte at a time would hold the connection forever."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class Guarded(Base):  # type: ignore[misc, valid-type]
        _headers_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("connection cap (%d) reached: closing a new connection", max_connections)
                transport.close()
                return
            self._arm_headers_timer()

        def _arm_headers_timer(self) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
            # the request cycle current when armed: a new request's completed headers replace it
            self._headers_timer = self.loop.call_later(header_timeout_s, self._no_headers, self.cycle)

        def _no_headers(self, armed_cycle: object) -> None:
            self._headers_timer = None
            if self.cycle is armed_cycle and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_headers_timer()  # the next request on this connection gets the same limit

        def connection_lost(self, exc: Exception | None) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
            super().connection_lost(exc)

    return Guarded


def _exit_now(code: int) -> None:
    """Leave while a model load/download still runs in a worker thread: waiting for it could take
    minutes, and nothing needs cleaning up (downloads are atomic, a half-loaded model is just memory)."""
    log.info("stopped (a model load was still running; not waiting for it)")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
