"""FastAPI application factory. Knows nothing about tensors: it talks to the ModelManager only.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/responses`` (OpenAI
compatible, streaming and not), ``GET /health``, ``GET /metrics`` (Prometheus).

The backend seam: ``manager`` is the local :class:`ModelManager` or anything with the same
``model_ids()`` / ``submit(req)`` contract (the Ray Serve backend forwards ``submit`` to per-model
deployments). A backend may also define ``async health() -> dict`` and ``async metrics() -> bytes``,
used by ``/health`` and ``/metrics`` instead of the local manager's status and this process's registry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from openai.types import Model
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ServerSettings, Settings, builtin_settings
from ..cpu import cpu_info
from ..engine import metrics
from ..engine.manager import ModelManager
from ..engine.types import Finished
from . import chat, responses, sse
from .budget import PixelBudget
from .documents import extract_for_open_webui, model_kind, output_options, start_ocr
from .errors import ApiError, error_body, human_bytes, install_exception_handlers
from .messages import collapse_chat, collapse_responses
from .requestlog import RequestLog
from .schemas import ChatCompletionRequest, ResponsesRequest, parse_body, refuse_unsupported
from .service import Generation, build_request, check_model

_ENDPOINTS = {"/v1/models", "/v1/chat/completions", "/v1/responses", "/health", "/ready", "/metrics", "/process"}
_STARTED = int(time.time())
T = TypeVar("T")


class LimitsAndMetrics:
    """ASGI middleware: authentication of ``/v1/*`` (401 before any byte of the body is read), the
    request-body cap (413) and the per-response request counter."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None = None,
                 body_timeout_s: float = 60.0) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.api_key = api_key
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status_box = [0]
        rlog = RequestLog(scope.get("method", ""), path if path in _ENDPOINTS else path[:200])
        scope.setdefault("state", {})["request_log"] = rlog

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = rlog.status = int(message["status"])
            elif message["type"] == "http.response.body":
                rlog.response_body(message.get("body", b""), message.get("more_body", False))
            await send(message)

        try:
            if (self.api_key and path.startswith("/v1/") and scope.get("method") != "OPTIONS"
                    and not key_matches(Headers(scope=scope), self.api_key)):
                await _unauthorized().response()(scope, receive, send_wrapper)
                return
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    body_receive = await self._read_body(scope, receive)
            except TimeoutError:
                await ApiError(
                    f"The request body was not received within {self.body_timeout_s:g} s.", status=408,
                    code="request_timeout",
                ).response()(scope, receive, send_wrapper)
                return
            if body_receive is None:
                resp = JSONResponse(
                    error_body(f"The request body is larger than the limit of {human_bytes(self.max_body)}.",
                               "invalid_request_error", None, "request_too_large"),
                    status_code=413,
                )
                await resp(scope, receive, send_wrapper)
                return
            await self.app(scope, body_receive, send_wrapper)
        finally:
            if status_box[0]:
                metrics.observe_request(endpoint, status_box[0])
            rlog.emit()

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """Read the whole body up front (bounded); None when it exceeds the cap."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return None
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                pending: list[Message] = [message]
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            if pending:
                return pending.pop(0)
            return await receive()

        return replay


def key_matches(headers: Any, api_key: str) -> bool:
    """``Authorization: Bearer <api_key>`` present (compared as UTF-8 bytes, in constant time)."""
    raw = headers.get("authorization", "")
    scheme, _, token = raw.partition(" ")
    if isinstance(token, str):  # starlette decodes header bytes as latin-1: undo it to get the client's bytes
        token_bytes = token.strip().encode("latin-1", "replace")
    else:
        token_bytes = token
    return scheme.lower() == "bearer" and secrets.compare_digest(token_bytes, api_key.encode("utf-8"))


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unauthorized() -> ApiError:
    return ApiError(
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
        status=401,
        type="invalid_request_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _auth_dependency(opts: ServerSettings) -> Any:
    """The same check as the middleware's, for apps mounted without it (and to show it in /docs)."""

    async def check(request: Request) -> None:
        if opts.api_key and not key_matches(request.headers, opts.api_key):
            raise _unauthorized()

    return check


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw`` (waiting for a queue slot, or a whole non-streaming generation); if the client goes
    away first, cancel it, which cancels the request in the engine."""
    work = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ApiError("client disconnected", status=499, code="client_disconnected")
    return work.result()


async def _collect(request: Request, gen: Generation) -> tuple[str, Finished]:
    try:
        return await _unless_disconnected(request, gen.collect())
    finally:
        await gen.aclose()


def _request_log(request: Request, model: str) -> RequestLog | None:
    rlog = request.scope.get("state", {}).get("request_log")
    if rlog is not None:
        rlog.model = model
    return rlog


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Document the JSON body in /docs (the handlers parse it themselves, see ``parse_body``)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:  # the request models are not recursive: inlining terminates
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the OpenAI error body with these statuses."""
    why = {
        400: "invalid request (the field is named in error.param)",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "request body too large",
        429: "server busy (see Retry-After)",
        499: "the client disconnected",
        503: "model unavailable, queue timeout or shutting down",
    }
    return {
        s: {"description": why[s], "content": {"application/json": {"schema": _ERROR_SCHEMA}}} for s in statuses
    }


_POST_ERRORS = _errors(400, 401, 404, 413, 429, 503)


def _model_states(manager: ModelManager, settings: Settings, ids: list[str]) -> dict[str, str]:
    st = manager.status()
    out: dict[str, str] = {}
    for mid in ids:
        if mid in st.failed:
            out[mid] = "failed"
        elif mid == st.model_id and st.state in ("ready", "loading"):
            out[mid] = st.state
        elif mid in st.resolving:
            out[mid] = "loading"
        else:
            out[mid] = _files_state(settings, mid)
    return out


def _files_state(settings: Settings, model_id: str) -> str:
    """``available`` when the entry's files are on disk, ``downloadable`` when it names a repo (a model
    the backend serves without a config entry is available)."""
    entry = settings.models.get(model_id)
    if entry is None:
        return "available"
    from ..assets import resolve_model_files  # file lookups only (no download, nothing loaded)

    try:
        resolve_model_files(settings, model_id, download=False)
        return "available"
    except Exception:  # noqa: BLE001 - missing files: can it be fetched?
        return "downloadable" if entry.repo else "unavailable"


def create_app(manager: ModelManager, settings: Settings | None = None) -> FastAPI:
    """The app around ``manager``. ``settings``: the server's resolved :class:`~..config.Settings`
    (its ``server`` table holds the limits, auth and CORS); None = the built-in ones."""
    settings = settings if settings is not None else builtin_settings()
    opts = settings.server
    # no "/v1/models/" -> "/v1/models" redirect: its absolute Location would be built from the client's
    # Host header (an open redirect); a trailing slash is simply a 404
    app = FastAPI(title="deepseek-ocr-server", redirect_slashes=False)
    app.state.manager = manager
    app.state.settings = settings
    app.state.options = opts
    pixels = PixelBudget(opts.max_pixels_in_flight)  # decoded image pixels held by requests in flight
    app.state.pixel_budget = pixels
    install_exception_handlers(app)

    app.add_middleware(LimitsAndMetrics, max_body_bytes=opts.max_body_bytes, api_key=opts.api_key,
                       body_timeout_s=opts.body_timeout_s)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=opts.cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        allow_credentials=False,
        expose_headers=["Retry-After"],
        max_age=600,
    )

    backend_health = getattr(manager, "health", None)
    backend_metrics = getattr(manager, "metrics", None)

    async def health_body(request: Request) -> dict[str, Any]:
        if backend_health is not None:  # a cluster backend (Ray Serve): its own status shape
            body = {"status": "ok", **(await backend_health())}
            body.setdefault("ready", body.get("state") == "ready")
        else:
            status = manager.status()
            body = {"status": "ok", "ready": status.state == "ready", **status.as_dict()}
        body["cpu"] = await asyncio.to_thread(cpu_info)
        metrics.publish_cpu_info(body["cpu"])
        # load errors name paths and admin settings: only the operator (loopback, or the API key) sees them
        if not (_is_loopback(request) or (opts.api_key and key_matches(request.headers, opts.api_key))):
            if body.get("error"):
                body["error"] = "failed to load (the server log has the reason)"
            if isinstance(body.get("failed"), dict):
                body["failed"] = {mid: "failed to load" for mid in body["failed"]}
        return body

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness: 200 while the process serves HTTP, whatever the model's state."""
        return await health_body(request)

    @app.get("/ready", responses={503: {"description": "no model is ready to serve (loading or failed)"}})
    async def ready(request: Request) -> Response:
        """Readiness: 200 when the resident model is loaded and serving, else 503 (loading or failed)."""
        body = await health_body(request)
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await backend_metrics() if backend_metrics is not None else generate_latest()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth_dependency(opts))])

    @v1.get("/models", responses=_errors(401))
    async def list_models() -> dict[str, Any]:
        """Every entry, the resident (else the configured active) model first, so that clients that
        preselect the first entry (Open WebUI) pick the one that serves; ``status`` (an extra field)
        says whether each is ``ready``, ``loading``, ``available`` (files on disk), ``downloadable``
        or ``failed``."""
        ids = manager.model_ids()
        if not hasattr(manager, "status"):  # a cluster backend: every model has its own deployment
            order, states = ids, {}
        else:
            st = manager.status()
            first = st.model_id if st.model_id in ids else settings.active
            order = sorted(ids, key=lambda mid: mid != first)  # stable: the others keep their order
            states = await asyncio.to_thread(_model_states, manager, settings, order)
        data = []
        for mid in order:
            entry = sse.dump(Model(id=mid, object="model", created=_STARTED, owned_by="deepseek-ocr-server"))
            if mid in states:
                entry["status"] = states[mid]
            data.append(entry)
        return {"object": "list", "data": data}

    @v1.post("/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest), responses=_POST_ERRORS)
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), ChatCompletionRequest)
        rlog = _request_log(request, body.model)
        refuse_unsupported(body)
        check_model(manager, body.model)
        conv = collapse_chat(body.messages)
        cid = "chatcmpl-" + uuid.uuid4().hex
        budget = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        budget_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        # (a client that leaves while its images download cancels the downloads)
        req = await _unless_disconnected(request, build_request(
            manager=manager, settings=settings, opts=opts, model_id=body.model, conv=conv, body=body,
            max_new_tokens=budget, budget_param=budget_param, stop=body.stop, request_id=cid, pixel_budget=pixels,
        ))
        if rlog is not None:
            rlog.req = req
        gen = await _unless_disconnected(
            request,
            start_ocr(manager, req, body.model, model_kind(settings, body.model), output_options(body), conv.text),
        )
        if rlog is not None:
            rlog.gen = gen
            rlog.first_event()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse.SSEResponse(chat.stream(gen, cid, body.model, include_usage))
        text, fin = await _collect(request, gen)
        return JSONResponse(sse.dump(chat.completion(cid, body.model, text, fin)))

    @v1.post("/responses", openapi_extra=_body_schema(ResponsesRequest), responses=_POST_ERRORS)
    async def create_response(request: Request) -> Response:
        body = parse_body(await request.body(), ResponsesRequest)
        rlog = _request_log(request, body.model)
        refuse_unsupported(body)
        check_model(manager, body.model)
        conv = collapse_responses(body.input, body.instructions)
        rid = "resp_" + uuid.uuid4().hex
        req = await _unless_disconnected(request, build_request(
            manager=manager, settings=settings, opts=opts, model_id=body.model, conv=conv, body=body,
            max_new_tokens=body.max_output_tokens, budget_param="max_output_tokens", stop=None, request_id=rid,
            pixel_budget=pixels,
        ))
        temperature = req.sampling.temperature if req is not None else (body.temperature or 0.0)
        top_p = req.sampling.top_p if req is not None else (body.top_p or 1.0)
        rb = responses.ResponseBuilder(rid, body.model, body, temperature, top_p)
        if rlog is not None:
            rlog.req = req
        gen = await _unless_disconnected(
            request,
            start_ocr(manager, req, body.model, model_kind(settings, body.model), output_options(body), conv.text),
        )
        if rlog is not None:
            rlog.gen = gen
            rlog.first_event()
        if body.stream:
            return sse.SSEResponse(responses.stream(gen, rb))
        text, fin = await _collect(request, gen)
        return JSONResponse(sse.dump(rb.final(text, fin)))

    app.include_router(v1)

    @app.put("/process", dependencies=[Depends(_auth_dependency(opts))])
    async def open_webui_extract(request: Request) -> Response:
        """Open WebUI's "External" content extraction engine (Documents settings): the raw document in the
        body, ``X-Filename`` naming it; answers ``{"page_content", "metadata"}``. ``?model=ID`` picks the
        model (default: the configured active model)."""
        ids = manager.model_ids()
        model_id = request.query_params.get("model") or (settings.active if settings.active in ids else ids[0])
        check_model(manager, model_id)
        filename = urllib.parse.unquote(request.headers.get("x-filename", "")) or None
        data = await request.body()
        out = await _unless_disconnected(
            request, extract_for_open_webui(manager, settings, data, filename, model_id)
        )
        return JSONResponse(out)

    return app
