"""``deepseek-ocr-server --ray [ADDRESS]``: deploy the application on a Ray cluster and serve until
Ctrl-C / SIGTERM.

ADDRESS as ``ray.init`` takes it: ``auto`` (the cluster ``ray start`` runs on this machine),
``HOST:PORT`` of a head node (this process joins as a driver), ``ray://HOST:10001`` (Ray Client).
Without it, ``RAY_ADDRESS`` is used if set, else a local Ray instance is started for this process
and stopped with it. HTTP listens on ``[server] host``/``port`` through Serve's proxy.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType

from ..config import ConfigError, Settings

log = logging.getLogger("deepseek_ocr_server")
PROG = "deepseek-ocr-server"


def run_ray(settings: Settings, address: str | None) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print(
            f"{PROG}: error: --ray needs Ray Serve: pip install 'deepseek-ocr-server[ray]'", file=sys.stderr
        )
        return 2
    from .deployments import APP_NAME, build_application

    try:
        app = build_application(settings)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    local = not address and not os.environ.get("RAY_ADDRESS")
    log.info("config file: %s", settings.config_path)
    for mid in settings.models:
        r = settings.ray_for(mid)
        log.info(
            "model %s: replicas %s%s, %g CPU / %g GPU each",
            mid,
            r.min_replicas,
            f"..{r.max_replicas} (autoscaling)" if r.max_replicas not in (None, r.min_replicas) else "",
            r.num_cpus,
            r.num_gpus,
        )
    try:
        ray.init(address=address or None, log_to_driver=True)
    except Exception as exc:  # noqa: BLE001 - a clear line instead of a traceback
        print(f"{PROG}: error: --ray {address or ''}: cannot connect to or start Ray: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    deploying = [True]

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()
        if deploying[0]:  # serve.run blocks until every replica is up: interrupt it
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
        log.info("deploying %s (every model loads on its replicas)...", APP_NAME)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a deployment failed: the others keep serving; /health says which
            log.error("deployment incomplete: %s", exc)
        deploying[0] = False
        log.info(
            "serving on http://%s:%s (Ray cluster at %s)",
            settings.server.host,
            settings.server.port,
            ray.get_runtime_context().gcs_address,
        )
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        log.info("interrupted while deploying")
    finally:
        deploying[0] = False
        log.info("stopping: removing application %s", APP_NAME)
        try:
            serve.delete(APP_NAME)
            if local:
                serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log.warning("while stopping Serve: %s", exc)
        for s, h in previous.items():
            signal.signal(s, h)
        ray.shutdown()
    log.info("stopped")
    return 0
