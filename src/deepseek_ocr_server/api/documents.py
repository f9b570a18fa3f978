"""The API's front end over the document pipeline (``documents/``): file parts, multi-page images, clean
output.

- Inputs: a request carries images (as before) or ONE document: a file part (PDF, or an image file), or
  an image part holding a multi-frame TIFF. A document's pages each run as one sequence (``pages``
  selects them, ``dpi`` sets the PDF render resolution); the answer is the pages' text in page order,
  each page after a ``<!-- page N -->`` line.
- Output (``output_format``): ``markdown`` (default: the family's post-processor cleans the text),
  ``raw`` (the model's text exactly), ``blocks`` (markdown, plus the structured result as the extra
  ``document`` field of the response: the last chunk before ``[DONE]`` for chat streams, the final
  response object for Responses). ``layout_images: true`` adds each page's boxes-drawn PNG to it.
- ``max_tokens`` applies to each page; usage adds up all pages; ``finish_reason`` is ``length`` if any
  page hit its budget.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..config import ServerSettings, Settings
from ..documents import (
    DocumentDone,
    DocumentError,
    DocumentOptions,
    DocumentResult,
    Page,
    PageDelta,
    PageFailed,
    PageJob,
    load_pages,
    page_jobs,
    page_prefix,
    run_jobs,
)
from ..documents.pages import is_pdf
from ..engine.manager import ModelManager
from ..engine.types import Event, Failed, Finished, OcrRequest, TextDelta
from .budget import PixelBudget, PixelLease
from .errors import ApiError, as_api_error
from .images import decode_data_url, decode_image, fetch_url, image_pixels
from .messages import Conversation, FileRef, ImageRef
from .schemas import DecodeFields
from .service import Generation, start


@dataclass
class DocumentInput:
    """A request whose input is a document: the engine request without images, and the pages."""

    template: OcrRequest
    pages: list[Page]

    @property
    def sampling(self) -> Any:
        return self.template.sampling


@dataclass
class DocumentFinished(Finished):
    """The end of an answer made by the pipeline; ``document`` is the structured result when asked for."""

    document: dict[str, Any] | None = field(default=None)


def output_options(body: DecodeFields) -> DocumentOptions:
    return DocumentOptions(output=body.output_format or "markdown", layout_images=bool(body.layout_images))


def model_kind(settings: Settings, model_id: str) -> str:
    """The kind of a configured model; ``plain`` for one the backend serves without a config entry."""
    entry = settings.models.get(model_id)
    return entry.kind if entry is not None else "plain"


def document_error(exc: DocumentError, param: str | None) -> ApiError:
    return ApiError(exc.message, status=400, param=param, code=exc.code)


# ------------------------------------------------------------------------------------------------
# reading the inputs


def decode_file_data(value: str, opts: ServerSettings, param: str) -> bytes:
    """``file_data``: a ``data:`` URL of any media type, or bare base64."""
    value = value.strip()
    if value[:5].lower() == "data:":
        head, sep, payload = value.partition(",")
        if not sep or "base64" not in [m.strip().lower() for m in head[5:].split(";")[1:]]:
            raise ApiError(
                "file_data data: URLs must be base64-encoded (data:application/pdf;base64,...)",
                param=param,
                code="invalid_file",
            )
        value = urllib.parse.unquote(payload)
    payload = "".join(value.split())
    if len(payload) > (opts.image_fetch_max_bytes * 4) // 3 + 4:
        raise ApiError(
            f"the file is larger than {opts.image_fetch_max_bytes} bytes", param=param, code="file_too_large"
        )
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("invalid base64 in file_data", param=param, code="invalid_base64") from None
    if not data:
        raise ApiError("the file is empty", param=param, code="invalid_file")
    return data


async def _file_bytes(ref: FileRef, opts: ServerSettings) -> bytes:
    if ref.data is not None:
        return decode_file_data(ref.data, opts, ref.param)
    assert ref.url is not None
    if ref.url.strip()[:5].lower() == "data:":
        return decode_file_data(ref.url, opts, ref.param)
    return await fetch_url(ref.url.strip(), opts, ref.param)  # the guarded fetcher of image URLs


async def _image_bytes(ref: ImageRef, opts: ServerSettings) -> bytes:
    url = ref.url.strip()
    if url[:5].lower() == "data:":
        return decode_data_url(url, opts, ref.param)
    return await fetch_url(url, opts, ref.param)


def _frames(data: bytes) -> int:
    """Frames of an image file (1 for anything that is not a multi-frame image); never raises."""
    if is_pdf(data):
        return 0
    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(getattr(img, "n_frames", 1))
    except Exception:  # noqa: BLE001 - decode_image reports bad images properly
        return 1


@dataclass
class Inputs:
    images: list[Image.Image]
    pages: list[Page] | None = None  # set for a document
    lease: PixelLease | None = None  # the images' share of the decoded-pixel budget


async def load_inputs(
    conv: Conversation, opts: ServerSettings, body: DecodeFields, pixel_budget: PixelBudget | None = None
) -> Inputs:
    """The request's images, or the pages of its one document. Every failure is a 400 ApiError."""
    from .service import gather_or_cancel

    fetched = await gather_or_cancel(
        [*(_image_bytes(ref, opts) for ref in conv.images), *(_file_bytes(ref, opts) for ref in conv.files)]
    )
    images_raw, files_raw = fetched[: len(conv.images)], fetched[len(conv.images) :]
    frames = await asyncio.gather(*(asyncio.to_thread(_frames, raw) for raw in images_raw))
    docs: list[tuple[bytes, str]] = [(raw, ref.param) for raw, ref in zip(files_raw, conv.files, strict=True)]
    docs += [(raw, ref.param) for raw, ref, n in zip(images_raw, conv.images, frames, strict=True) if n != 1]
    if not docs:
        if body.pages is not None:
            raise ApiError(
                "'pages' selects pages of a document (a PDF or multi-page TIFF file part)",
                param="pages",
                code="invalid_value",
            )
        # decoded pixels are bounded across requests (a lease the engine returns after preprocessing),
        # and decoded one image at a time: the transient memory of one decode
        pixels = sum(image_pixels(raw, opts, ref.param) for raw, ref in zip(images_raw, conv.images, strict=True))
        lease = pixel_budget.acquire(pixels) if pixel_budget is not None else None
        try:
            decoded = []
            for i, ref in enumerate(conv.images):
                decoded.append(await asyncio.to_thread(decode_image, images_raw[i], opts, ref.param))
                images_raw[i] = b""
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        return Inputs(decoded, lease=lease)
    if len(docs) > 1 or len(conv.images) + len(conv.files) > 1:
        raise ApiError(
            "send one document per request (a file part, or a multi-page image), without other images",
            param=docs[-1][1],
            code="too_many_documents",
        )
    raw, param = docs[0]
    dpi = body.dpi if body.dpi is not None else opts.pdf_dpi
    try:
        pages = await asyncio.to_thread(
            load_pages,
            raw,
            dpi=dpi,
            pages=body.pages,
            max_pages=opts.max_pages,
            max_pixels=opts.max_image_pixels,
        )
    except DocumentError as exc:
        raise document_error(exc, "pages" if exc.code == "invalid_pages" else param) from None
    return Inputs([], pages)


# ------------------------------------------------------------------------------------------------
# running


async def _events(
    it: AsyncIterator[Any], *, document: bool, options: DocumentOptions, include: bool
) -> AsyncIterator[Event]:
    """Pipeline events -> the engine's event shapes the endpoints stream (page markers included)."""
    raw = options.output == "raw"
    index = -1
    try:
        async for ev in it:
            if isinstance(ev, PageDelta):
                prefix = ""
                if ev.first:
                    index += 1
                    prefix = page_prefix(ev.page, index == 0) if document else ""
                if prefix or ev.text or ev.first:
                    yield TextDelta(prefix + ev.text)
            elif isinstance(ev, DocumentDone):
                result: DocumentResult = ev.result
                if document:
                    text = result.joined(raw)
                else:
                    page = result.pages[0]
                    text = page.raw if raw else page.markdown
                yield DocumentFinished(
                    result.finish_reason,
                    result.prompt_tokens,
                    result.completion_tokens,
                    text,
                    document=result.to_dict() if include else None,
                )
                return
    except PageFailed as exc:
        yield Failed(exc.message, exc.status, exc.type)
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def start_ocr(
    manager: ModelManager,
    req: OcrRequest | DocumentInput | None,
    model_id: str,
    kind: str,
    options: DocumentOptions,
    text: str = "",
) -> Generation:
    """Start the generation of a request through the pipeline (its first event fetched, so that admission
    errors become HTTP statuses). Image requests in raw output without extras take the engine's events
    directly; everything else is post-processed."""
    include = options.output == "blocks" or options.layout_images
    if req is None or (isinstance(req, OcrRequest) and options.output == "raw" and not include):
        return await start(manager, req, model_id, text)
    if isinstance(req, DocumentInput):
        jobs, document = page_jobs(req.pages, req.template), True
    else:
        jobs, document = [PageJob(1, req.images[0], req)], False
    it = _events(
        run_jobs(manager, jobs, kind, options, model_id=model_id),
        document=document,
        options=options,
        include=include,
    )
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        raise ApiError("generation ended without a result", status=500, type="server_error") from None
    except BaseException as exc:
        await it.aclose()
        if isinstance(exc, Exception):
            raise as_api_error(exc) from None
        raise
    if isinstance(first, Failed):
        await it.aclose()
        raise ApiError(first.message, status=first.status, type=first.type)
    return Generation(first, it)


# ------------------------------------------------------------------------------------------------
# Open WebUI's "External" document extraction engine: PUT /process


async def extract_for_open_webui(
    manager: ModelManager, settings: Settings, data: bytes, filename: str | None, model_id: str
) -> dict[str, Any]:
    """A document (the raw request body) -> ``{"page_content": markdown, "metadata": {...}}``, the answer
    Open WebUI's external extraction engine expects. Figures are left out of the markdown (their data URLs
    would only add noise to the retrieval index); pages are marked with ``<!-- page N -->``."""
    from .resolve import default_prompt, model_defaults

    opts = settings.server
    if not data:
        raise ApiError("the request body is empty: send the document's bytes", code="invalid_file")
    try:
        pages = await asyncio.to_thread(
            load_pages, data, dpi=opts.pdf_dpi, max_pages=opts.max_pages, max_pixels=opts.max_image_pixels
        )
    except DocumentError as exc:
        raise document_error(exc, None) from None
    inference = model_defaults(settings, model_id)
    template = OcrRequest(
        model_id=model_id,
        text=default_prompt(settings, model_id),
        images=[],
        options=settings.options_for(model_id) if model_id in settings.models else {},
        sampling=inference.sampling(),
        max_new_tokens=inference.max_new_tokens,
    )
    options = DocumentOptions(figures=lambda *_: None)
    result: DocumentResult | None = None
    try:
        async for ev in run_jobs(
            manager, page_jobs(pages, template), model_kind(settings, model_id), options, model_id=model_id
        ):
            if isinstance(ev, DocumentDone):
                result = ev.result
    except Exception as exc:  # noqa: BLE001 - mapped to the client's error
        raise as_api_error(exc) from None
    assert result is not None
    return {
        "page_content": result.joined(),
        "metadata": {
            "source": filename or "document",
            "model": model_id,
            "pages": len(result.pages),
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
        },
    }
