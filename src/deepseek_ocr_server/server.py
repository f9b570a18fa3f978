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


def build_loader(settings: Settings) -> Callable[[str], object]:
    """``loader(model_id)`` for the ModelManager: resolve (maybe download) assets, then load the model
    with the model's effective device/dtype/quantize (blocking; the manager calls it in a thread)."""

    def load(model_id: str) -> object:
        from .assets import resolve_model_files
        from .models import load_model

        entry = settings.entry(model_id)
        inf = settings.inference_for(model_id)
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


def build_resolver(settings: Settings) -> Callable[[str], object]:
    """``resolver(model_id)`` for the ModelManager: find (maybe download) the files of a model without
    touching the resident one, so that a broken or absent entry never evicts it."""

    def resolve(model_id: str) -> object:
        from .assets import resolve_model_files

        return resolve_model_files(settings, model_id)

    return resolve


def build_app(settings: Settings):  # -> (FastAPI, ModelManager)
    from .api.app import create_app
    from .engine.manager import ModelManager

    srv = settings.server
    manager = ModelManager(
        list(settings.models),
        build_loader(settings),
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
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,  # use our logging setup (root handler)
        log_level=logging.getLogger().level or logging.INFO,
        timeout_graceful_shutdown=5,
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

    async def serve() -> None:
        await manager.preload(settings.active)
        try:
            await server.serve(sockets=[sock])
        finally:
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


def _exit_now(code: int) -> None:
    """Leave while a model load/download still runs in a worker thread: waiting for it could take
    minutes, and nothing needs cleaning up (downloads are atomic, a half-loaded model is just memory)."""
    log.info("stopped (a model load was still running; not waiting for it)")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
