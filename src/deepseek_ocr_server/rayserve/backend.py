"""The ingress side of cluster mode: the backend :func:`..api.app.create_app` talks to instead of a
local :class:`~..engine.manager.ModelManager`.

``submit(req)`` streams the events of ``req`` from one replica of the model's deployment
(``handle.options(stream=True).generate.remote(req)``; Serve picks the replica by power of two choices
on ongoing requests). Closing the stream (a client disconnect) cancels the Serve request, which cancels
the sequence in the replica's engine. When the replica dies before anything was streamed the request is
sent again (another replica, or the restarted one); after the first event it ends with a 503 ``Failed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import generate_latest
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from ..engine.errors import EngineError, ModelUnavailable, Overloaded, UnknownModel
from ..engine.types import Event, Failed, Finished, OcrRequest
from . import metrics as merged_metrics
from .wire import Rejected

log = logging.getLogger(__name__)

#: sends of one request when its replica dies before the first event (the first send included)
ATTEMPTS = 3
#: how long /health and /metrics wait for the replicas' answers
STATUS_TIMEOUT_S = 5.0
_LOST = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)


class RayBackend:
    """``model_ids`` / ``submit`` / ``health`` / ``metrics`` over the per-model deployments."""

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        deployment_names: dict[str, str],
        app_name: str,
    ) -> None:
        self._handles = dict(handles)
        self._names = dict(deployment_names)
        self._app = app_name

    def model_ids(self) -> list[str]:
        return list(self._handles)

    def submit(self, req: OcrRequest) -> AsyncIterator[Event]:
        if req.model_id not in self._handles:
            raise UnknownModel(
                f"model {req.model_id!r} not found; available: {', '.join(self._handles)}", param="model"
            )
        # the decoded-image share stays in this process (returned when the HTTP request ends): the
        # request that travels to a replica carries no callback
        return self._events(dataclasses.replace(req, release_images=None))

    async def _events(self, req: OcrRequest) -> AsyncIterator[Event]:
        handle = self._handles[req.model_id].options(stream=True)
        for attempt in range(1, ATTEMPTS + 1):
            gen = handle.generate.remote(req)
            streamed = False
            done = False
            try:
                async for item in gen:
                    if isinstance(item, Rejected):
                        done = True
                        raise item.to_error()
                    streamed = True
                    yield item
                    if isinstance(item, Finished | Failed):
                        done = True
                        return
                done = True
                raise EngineError("the model replica ended the stream without a result")
            except EngineError:
                raise
            except BackPressureError as exc:
                done = True
                raise Overloaded(f"every replica of {req.model_id} is busy: {exc}", retry_after=1.0) from None
            except _LOST as exc:
                done = True
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if streamed:
                    log.warning(
                        "request %s: replica of %s lost mid-stream (%s)", req.request_id, req.model_id, why
                    )
                    yield Failed(
                        f"the replica serving {req.model_id} stopped during this request ({why}); retry it",
                        status=503,
                    )
                    return
                if attempt == ATTEMPTS:
                    raise ModelUnavailable(
                        f"no replica of {req.model_id} could serve the request after {ATTEMPTS} tries ({why})"
                    ) from None
                log.warning(
                    "request %s: replica of %s lost before its first token (%s); sending it again",
                    req.request_id,
                    req.model_id,
                    why,
                )
                await asyncio.sleep(0.2 * attempt)
            except (RequestCancelledError, TaskCancelledError):
                done = True
                raise asyncio.CancelledError from None
            except RayTaskError as exc:  # a bug in the replica: never silent, never a hang
                done = True
                raise EngineError(f"model replica error: {str(exc).splitlines()[0]}") from None
            finally:
                if not done:  # closed by the consumer (client gone): cancel in the replica
                    gen.cancel()

    # --- health and metrics -------------------------------------------------------------------------
    async def _broadcast(self, model_id: str, method: str) -> list[Any]:
        try:
            resp = self._handles[model_id].broadcast(method)
            return await asyncio.wait_for(resp.results_async(return_exceptions=True), STATUS_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - reported in /health, never fatal
            return [exc]

    async def health(self) -> dict[str, Any]:
        """Every model's deployment (Serve's status, replica counts by state) and every running
        replica's engine status (``loading``/``ready``/``failed`` with the reason, running, queued)."""
        try:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self._app)
        except Exception as exc:  # noqa: BLE001
            log.warning("serve.status() failed: %s", exc)
            app = None
        ids = self.model_ids()
        answers = await asyncio.gather(*(self._broadcast(mid, "status") for mid in ids))
        models: dict[str, Any] = {}
        for mid, replies in zip(ids, answers, strict=True):
            dep = app.deployments.get(self._names[mid]) if app is not None else None
            replicas = [r for r in replies if isinstance(r, dict)]
            errors = [f"{type(r).__name__}: {r}" for r in replies if not isinstance(r, dict)]
            states = [r.get("state") for r in replicas]
            if "ready" in states:
                state = "ready"
            elif "failed" in states:
                state = "failed"
            elif not replicas and dep is not None and not any(dep.replica_states.values()):
                state = "idle"  # scaled to zero (min_replicas = 0): the next request starts a replica
            else:
                state = "loading"
            models[mid] = {
                "deployment": self._names[mid],
                "state": state,
                "deployment_status": str(dep.status) if dep is not None else None,
                "message": (dep.message or None) if dep is not None else None,
                "replica_states": {str(k): v for k, v in dep.replica_states.items()}
                if dep is not None
                else {},
                "replicas": replicas,
                "unreachable": errors,
            }
        overall = [m["state"] for m in models.values()]
        if all(s in ("ready", "idle") for s in overall):
            state = "ready"
        else:
            state = "failed" if "failed" in overall else "loading"
        return {
            "mode": "ray",
            "state": state,
            "application": self._app,
            "application_status": str(app.status) if app is not None else None,
            "ingress": {"host": socket.gethostname()},
            "models": models,
        }

    async def metrics(self) -> bytes:
        ids = self.model_ids()
        answers = await asyncio.gather(*(self._broadcast(mid, "metrics") for mid in ids))
        texts = [
            ({"model": mid, "replica": str(r[0])}, r[1])
            for mid, replies in zip(ids, answers, strict=True)
            for r in replies
            if isinstance(r, tuple)
        ]
        return merged_metrics.merge(generate_latest(), texts)
