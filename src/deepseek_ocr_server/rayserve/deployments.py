"""The Ray Serve application: :class:`OcrIngress` (our FastAPI app, the same routes, auth, limits,
errors and SSE as the single-process server) in front of one :class:`ModelServer` deployment per
configured model id. Each model replica owns a :class:`~..engine.manager.ModelManager` holding only
its model (continuous batching inside; never a swap).

Build it with :func:`build_application` (``deepseek-ocr-server --ray``) or, for ``serve run`` /
``serve deploy``, from the import path ``deepseek_ocr_server.rayserve.deployments:app_builder`` with the
argument ``config`` (the config.toml to load).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from prometheus_client import generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..config import ConfigError, Settings, load_settings
from ..engine.types import Event, OcrRequest
from .wire import Rejected

log = logging.getLogger("deepseek_ocr_server.rayserve")

APP_NAME = "deepseek-ocr"
INGRESS_NAME = "OcrIngress"
#: concurrent HTTP requests one ingress replica takes (it only parses, fetches images and relays
#: events; the model replicas' queues are the limit, and answer 429 beyond them)
INGRESS_MAX_ONGOING = 1000


def deployment_name(model_id: str) -> str:
    """``model-<id>`` with characters Serve does not allow in names replaced by ``_``."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)


class ModelServer:
    """One replica of one model: the model resident in our engine, loaded in the constructor (Serve
    routes to a replica only once its constructor returned, so rolling updates and scale-ups never
    send requests to a loading replica). A load failure does not kill the replica: it reports
    ``failed`` with the reason in ``status`` (and ``/health``) and answers 503 with it, retrying the
    load on a request after the engine's retry delay."""

    async def __init__(self, settings: Settings, model_id: str) -> None:
        from ..engine.manager import ModelManager
        from ..server import build_loader

        ctx = serve.get_replica_context()
        self.model_id = model_id
        self.replica = ctx.replica_id.unique_id
        #: the replica's Ray actor name (namespace "serve"): ``ray.get_actor(name, namespace="serve")``
        self.actor_name = ctx.replica_id.to_full_id_str()
        self.node = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()
        num_cpus = settings.ray_for(model_id).num_cpus
        if num_cpus >= 1:
            import torch

            torch.set_num_threads(int(num_cpus))
        srv = settings.server
        self.manager = ModelManager(
            [model_id],
            build_loader(settings),
            max_running=srv.max_running,
            max_queued=srv.max_queued,
            queue_timeout_s=srv.queue_timeout_s,
            prefill_slice_s=srv.prefill_slice_s,
        )
        log.info(
            "replica %s of %s on node %s (%s): loading the model (files: %s)",
            self.replica,
            model_id,
            self.host,
            self.node[:12],
            settings.model_dir(model_id),
        )
        t0 = time.perf_counter()
        await self.manager.preload(model_id)
        while self.manager.status().state not in ("ready", "failed"):
            await asyncio.sleep(0.05)
        st = self.manager.status()
        if st.state == "ready":
            log.info(
                "replica %s of %s on node %s: model ready in %.1f s",
                self.replica,
                model_id,
                self.host,
                time.perf_counter() - t0,
            )
        else:
            log.error(
                "replica %s of %s on node %s: model failed to load: %s",
                self.replica,
                model_id,
                self.host,
                st.error,
            )

    async def generate(self, req: OcrRequest) -> AsyncIterator[Event | Rejected]:
        """The events of ``req`` (``TextDelta``*, then ``Finished`` or ``Failed``), or one ``Rejected``
        for an error before the first event. Cancelling the Serve request closes the engine stream,
        which cancels the sequence and frees its slot."""
        try:
            it = self.manager.submit(req)
        except Exception as exc:  # noqa: BLE001 - sent to the ingress, which maps it to the client's error
            yield Rejected.from_error(exc)
            return
        try:
            async for ev in it:
                yield ev
        except Exception as exc:  # noqa: BLE001 - engine errors come before the first event
            yield Rejected.from_error(exc)
        finally:
            await it.aclose()

    def status(self) -> dict[str, Any]:
        st = self.manager.status()
        return {
            "replica": self.replica,
            "actor_name": self.actor_name,
            "host": self.host,
            "node_id": self.node,
            "state": st.state,
            "error": st.error or st.failed.get(self.model_id),
            "load_seconds": st.load_seconds,
            "running": st.running,
            "queued": st.queued,
        }

    def metrics(self) -> tuple[str, str]:
        return self.replica, generate_latest().decode()

    async def __del__(self) -> None:
        await self.manager.shutdown()


@serve.ingress()
class OcrIngress:
    """The HTTP ingress: :func:`..api.app.create_app` over a :class:`.backend.RayBackend`. Building the
    app on the replica (``__serve_build_asgi_app__``) keeps it one app, not a pickled copy."""

    def __init__(
        self, settings: Settings, models: dict[str, DeploymentHandle], names: dict[str, str]
    ) -> None:
        from .backend import RayBackend

        app_name = serve.get_replica_context().replica_id.deployment_id.app_name
        self.settings = settings
        self.backend = RayBackend(models, names, app_name)

    def __serve_build_asgi_app__(self) -> Any:
        from ..api.app import create_app

        return create_app(self.backend, self.settings)


def model_deployment_options(settings: Settings, model_id: str) -> dict[str, Any]:
    """Serve options of one model's deployment, from ``settings.ray_for(model_id)`` and the engine
    limits: a replica takes ``max_running + max_queued + 1`` requests so that its own queue answers 429
    (with Retry-After) before Serve would hold requests back."""
    r = settings.ray_for(model_id)
    srv = settings.server
    opts: dict[str, Any] = {
        "name": deployment_name(model_id),
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "max_ongoing_requests": srv.max_running + srv.max_queued + 1,
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 10,
    }
    hi = r.max_replicas if r.max_replicas is not None else r.min_replicas
    if hi > r.min_replicas or r.min_replicas == 0:
        opts["autoscaling_config"] = {
            "min_replicas": r.min_replicas,
            "max_replicas": max(1, hi),
            "target_ongoing_requests": r.target_ongoing_requests or float(srv.max_running),
        }
    else:
        opts["num_replicas"] = r.min_replicas
    return opts


def build_application(settings: Settings, *, ingress_options: dict[str, Any] | None = None) -> Any:
    """The Serve application for ``settings``: every configured model gets a deployment."""
    for mid in settings.models:
        settings.ray_for(mid)  # raises ConfigError for inconsistent bounds
    handles = {}
    names = {}
    for mid in settings.models:
        opts = model_deployment_options(settings, mid)
        names[mid] = opts["name"]
        handles[mid] = serve.deployment(ModelServer).options(**opts).bind(settings, mid)
    ingress = serve.deployment(OcrIngress).options(
        name=INGRESS_NAME,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},  # it only relays: never holds back a model replica
        **(ingress_options or {}),
    )
    return ingress.bind(settings, handles, names)


def app_builder(args: dict[str, str]) -> Any:
    """Application builder for ``serve run deepseek_ocr_server.rayserve.deployments:app_builder
    config=/path/config.toml`` and the ``import_path`` + ``args`` of a serve_config.yaml."""
    args = dict(args or {})
    config = args.pop("config", None)
    if args:
        raise ConfigError(f"unknown application arguments {', '.join(sorted(args))} (allowed: config)")
    return build_application(load_settings({}, config))
