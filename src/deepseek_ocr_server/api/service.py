"""The part of a request both endpoints share: model check, conversation, images, defaults, engine call.

``start`` returns a :class:`Generation` whose FIRST event is already fetched, so that admission errors
(429 with Retry-After, queue timeout, model load failure, model input errors) become proper HTTP
statuses even for streaming requests. Closing a Generation closes the engine's iterator, which cancels
the sequence in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import anyio

from ..config import ServerSettings, Settings
from ..engine.manager import ModelManager, UnknownModel
from ..engine.types import Event, Failed, Finished, OcrRequest, TextDelta
from .budget import PixelBudget
from .errors import ApiError, as_api_error
from .messages import Conversation
from .resolve import default_prompt, resolve, stop_list
from .schemas import DecodeFields

T = TypeVar("T")


def check_model(manager: ModelManager, model_id: str) -> None:
    ids = manager.model_ids()
    if model_id not in ids:
        raise as_api_error(
            UnknownModel(
                f"The model '{model_id}' does not exist. Available models: {', '.join(ids)}", param="model"
            )
        )


_NOTICE = {
    "en": "I read text from images. Please attach an image, such as a photo or a scan of a page, "
    "to your message and send it again.",
    "zh": "我只能识别图片中的文字。请在消息中附上一张图片（例如照片或文档扫描件）后再发送。",
}


def no_image_notice(model_id: str, text: str = "") -> str:
    """The answer to a message without an image, written for the end user of a chat UI: in Chinese
    when the message is mostly CJK text, else in English."""
    cjk = sum(1 for ch in text if "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff")
    letters = sum(1 for ch in text if ch.isalpha())
    return _NOTICE["zh" if letters and cjk * 2 >= letters else "en"]


def failed_error(ev: Failed) -> ApiError:
    code = "invalid_input" if ev.status == 400 else None
    return ApiError(ev.message, status=ev.status, type=ev.type, code=code)


async def build_request(
    *,
    manager: ModelManager,
    settings: Settings,
    opts: ServerSettings,
    model_id: str,
    conv: Conversation,
    body: DecodeFields,
    max_new_tokens: int | None,
    budget_param: str,
    stop: str | list[str] | None,
    request_id: str,
    pixel_budget: PixelBudget | None = None,
) -> Any:
    """The engine request, a ``DocumentInput`` (``api/documents.py``) when the input is a document, or
    None when the message carries no image and no file (answered without the model)."""
    from .documents import DocumentInput, load_inputs  # (documents.py builds on this module)

    sampling, options, budget = resolve(body, model_id, settings, max_new_tokens, budget_param=budget_param)
    stops = stop_list(stop)
    chars = len(conv.text) + len(conv.system or "") + len(conv.answer_prefix or "")
    if chars > opts.max_prompt_chars:
        raise ApiError(
            f"The text of the request is {chars} characters long; this server accepts at most "
            f"{opts.max_prompt_chars}.",
            code="prompt_too_long",
        )
    if not conv.images and not conv.files:
        return None
    if len(conv.images) > opts.max_images_per_request:
        raise ApiError(
            f"too many images: {len(conv.images)} (this server accepts at most {opts.max_images_per_request} per request)",
            param=conv.images[opts.max_images_per_request].param,
            code="too_many_images",
        )
    inputs = await load_inputs(conv, opts, body, pixel_budget)
    text = conv.text if conv.text.strip() else default_prompt(settings, model_id)
    req = OcrRequest(
        model_id=model_id,
        text=text,
        images=inputs.images,
        release_images=inputs.lease.release if inputs.lease is not None else None,
        options=options,
        sampling=sampling,
        max_new_tokens=budget,
        stop=stops,
        system=conv.system,
        request_id=request_id,
        answer_prefix=conv.answer_prefix,
    )
    return DocumentInput(req, inputs.pages) if inputs.pages is not None else req


async def gather_or_cancel(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently (image and file downloads). The first failure cancels the others, and
    so does cancelling this call (e.g. when the client disconnects): no download is left orphaned."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def release_images(req: OcrRequest | None) -> None:
    if req is not None and req.release_images is not None:
        req.release_images()


async def _static(events: list[Event]) -> AsyncIterator[Event]:
    for ev in events:
        yield ev


class Generation:
    """An accepted generation: the first event fetched, the rest to come."""

    def __init__(self, first: Event, it: AsyncIterator[Event], req: OcrRequest | None = None) -> None:
        self.first = first
        self._it = it
        self._closed = False
        self._req = req
        self.finished: Finished | None = None  # the last event, once seen (for the request log)
        self.failed: Failed | None = None

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            self._note(self.first)
            yield self.first
            if isinstance(self.first, Finished | Failed):
                return
            async for ev in self._it:
                self._note(ev)
                yield ev
                if isinstance(ev, Finished | Failed):
                    return
        finally:
            await self.aclose()

    def _note(self, ev: Event) -> None:
        if isinstance(ev, Finished):
            self.finished = ev
        elif isinstance(ev, Failed):
            self.failed = ev

    async def aclose(self) -> None:
        """Close the engine iterator (cancels the sequence); safe to call twice and under cancellation."""
        if self._closed:
            return
        self._closed = True
        release_images(self._req)
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await aclose()

    async def collect(self) -> tuple[str, Finished]:
        """Run to the end (non-streaming). Raises ApiError if the generation fails."""
        parts: list[str] = []
        async for ev in self:
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            elif isinstance(ev, Finished):
                return ev.text if ev.text else "".join(parts), ev
            elif isinstance(ev, Failed):
                raise failed_error(ev)
        raise ApiError("generation ended without a result", status=500, type="server_error")


async def start(manager: ModelManager, req: OcrRequest | None, model_id: str, text: str = "") -> Generation:
    """Submit ``req``; ``None`` (no image) is answered with a notice for the user (``text``: the
    message, to pick the notice's language)."""
    if req is None:
        notice = no_image_notice(model_id, text)
        return Generation(TextDelta(notice), _static([Finished("stop", 0, 0, notice)]))
    try:
        it = manager.submit(req)
    except Exception as exc:  # noqa: BLE001 - mapped to the client's error
        release_images(req)
        raise as_api_error(exc) from None
    except BaseException:
        release_images(req)
        raise
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        release_images(req)
        raise ApiError("generation ended without a result", status=500, type="server_error") from None
    except BaseException as exc:
        gen = Generation(TextDelta(""), it, req)
        await gen.aclose()
        if isinstance(exc, Exception):
            raise as_api_error(exc) from None
        raise
    if isinstance(first, Failed):
        await Generation(first, it, req).aclose()
        raise failed_error(first)
    return Generation(first, it, req)
