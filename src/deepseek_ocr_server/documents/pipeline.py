"""Pages -> the engine (one sequence per page) -> post-processed page results, in page order.

See the package docstring for the interface. The engine side is ``ModelManager.submit_group``: the
pages of one document count as one request against the queue limits and share the running slots
fairly with other requests; they are computed concurrently (batched decode) and this module emits
them in page order. Closing the event iterator cancels every page.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from PIL import Image

from ..engine.errors import EngineError
from ..engine.types import Failed, Finished, OcrRequest, TextDelta
from .pages import Page

if TYPE_CHECKING:
    from ..config import Settings
from .postprocess import StreamCleaner, for_kind
from .postprocess.base import Box
from .render import crop, data_url, draw_layout, figure_data_url
from .schema import DocumentResult, PageResult

OutputFormat = Literal["markdown", "raw", "blocks"]
OUTPUT_FORMATS: tuple[str, ...] = ("markdown", "raw", "blocks")

#: ``figures(page_number, index, crop) -> link`` stores one figure crop and returns the link the markdown
#: and the block use (None: leave the figure out of the markdown). The default embeds a JPEG data URL.
FigureSink = Callable[[int, int, Image.Image], str | None]


@dataclass(frozen=True)
class DocumentOptions:
    """How pages are post-processed. ``output``: ``markdown`` (clean, default), ``raw`` (the model's text
    exactly) or ``blocks`` (clean markdown, and the caller shows the structured result). ``layout_images``:
    each page result carries a PNG data URL of the page with its boxes drawn. ``figures``: where figure
    crops go (default: JPEG data URLs in the markdown)."""

    output: OutputFormat = "markdown"
    layout_images: bool = False
    figures: FigureSink | None = None


@dataclass
class PageDelta:
    page: int  # page number
    text: str  # new text of that page in the chosen output (raw or clean markdown); may be empty
    first: bool = False  # the page's first event


@dataclass
class PageDone:
    result: PageResult


@dataclass
class DocumentDone:
    result: DocumentResult


DocEvent = PageDelta | PageDone | DocumentDone


class PageFailed(EngineError):
    """A page's generation broke after it had started (the engine's ``Failed`` event)."""

    def __init__(self, page: int, message: str, status: int = 500, type: str = "server_error") -> None:
        super().__init__(f"page {page}: {message}")
        self.page = page
        self.status = status
        self.type = type


class Submitter(Protocol):
    """What the pipeline needs of the engine (``ModelManager`` has it)."""

    def submit(self, req: OcrRequest) -> Any: ...

    def submit_group(self, reqs: list[OcrRequest]) -> list[Any]: ...


@dataclass
class PageJob:
    number: int
    image: Image.Image  # the page as the model sees it (sizes, boxes and crops refer to it)
    request: OcrRequest


def page_jobs(pages: list[Page], template: OcrRequest) -> list[PageJob]:
    """One engine request per page: ``template`` with the page as its only image."""
    return [PageJob(p.number, p.image, replace(template, images=[p.image])) for p in pages]


def _figure_link(job: PageJob, sink: FigureSink | None) -> Callable[[Box], str | None]:
    count = 0

    def link(box: Box) -> str | None:
        nonlocal count
        count += 1
        if sink is None:
            return figure_data_url(job.image, box)
        return sink(job.number, count, crop(job.image, box))

    return link


async def run_jobs(
    manager: Submitter,
    jobs: list[PageJob],
    kind: str,
    options: DocumentOptions | None = None,
    *,
    model_id: str = "",
) -> AsyncIterator[DocEvent]:
    """Submit every job as one sequence of one document and yield its events in page order:
    ``PageDelta``* then ``PageDone`` per page, then one ``DocumentDone``.

    Raises the engine's errors (``Overloaded``, ``QueueTimeout``, ``BadRequest`` ...; a later page's
    error names the page) and :class:`PageFailed`. Closing the iterator cancels every page."""
    opts = options or DocumentOptions()
    pp = for_kind(kind)
    # one page is one plain request; several are one group (one request for the queue, fair slots)
    streams = (
        [manager.submit(jobs[0].request)]
        if len(jobs) == 1
        else manager.submit_group([j.request for j in jobs])
    )
    result = DocumentResult(model_id or jobs[0].request.model_id)
    try:
        for job, stream in zip(jobs, streams, strict=True):
            w, h = job.image.size
            cleaner = StreamCleaner(pp, w, h, _figure_link(job, opts.figures))
            first = True
            fin: Finished | None = None
            try:
                async for ev in stream:
                    if isinstance(ev, TextDelta):
                        clean = cleaner.feed(ev.text)
                        text = ev.text if opts.output == "raw" else clean
                        if text or first:
                            yield PageDelta(job.number, text, first)
                            first = False
                    elif isinstance(ev, Finished):
                        fin = ev
                        break
                    elif isinstance(ev, Failed):
                        raise PageFailed(job.number, ev.message, ev.status, ev.type)
            except EngineError as exc:
                if len(jobs) > 1 and not isinstance(exc, PageFailed):
                    exc.message = f"page {job.number}: {exc.message}"
                    exc.args = (exc.message,)
                raise
            if fin is None:
                raise PageFailed(job.number, "generation ended without a result")
            tail, content = cleaner.finish()
            if opts.output != "raw" and (tail or first):
                yield PageDelta(job.number, tail, first)
                first = False
            if first:
                yield PageDelta(job.number, "", True)
            page = PageResult(
                page=job.number,
                width=w,
                height=h,
                raw=cleaner.raw,
                content=content,
                finish_reason=fin.finish_reason,
                prompt_tokens=fin.prompt_tokens,
                completion_tokens=fin.completion_tokens,
            )
            if opts.layout_images:
                page.layout_image = await asyncio.to_thread(
                    lambda im=job.image, blocks=content.blocks: data_url(draw_layout(im, blocks))
                )
            result.pages.append(page)
            yield PageDone(page)
        yield DocumentDone(result)
    finally:
        for stream in streams:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def run_pages(
    manager: Submitter,
    pages: list[Page],
    template: OcrRequest,
    kind: str,
    options: DocumentOptions | None = None,
) -> AsyncIterator[DocEvent]:
    """The pages of a document through the engine (see :func:`run_jobs`)."""
    async for ev in run_jobs(manager, page_jobs(pages, template), kind, options, model_id=template.model_id):
        yield ev


def request_template(
    settings: Settings, model_id: str, *, prompt: str | None = None, max_new_tokens: int | None = None
) -> OcrRequest:
    """An engine request with the configured defaults of ``model_id`` (sampling, vision settings, token
    budget, default prompt); :func:`page_jobs` fills in each page's image."""
    d = settings.inference_for(model_id)
    return OcrRequest(
        model_id=model_id,
        text=prompt if prompt is not None else settings.default_prompt(model_id),
        images=[],
        options=settings.options_for(model_id),
        sampling=d.sampling(),
        max_new_tokens=max_new_tokens if max_new_tokens is not None else d.max_new_tokens,
    )
