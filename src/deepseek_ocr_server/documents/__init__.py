"""Documents end to end: input -> pages -> one engine sequence per page -> post-processing -> result.

This package is the one document pipeline behind every front end (the HTTP API, the batch CLI, the Ray
app). Its interface (stable; extend, don't rename):

Pages (``pages.py``, blocking: call from a worker thread)
    ``load_pages(source, *, dpi=144, pages=None, max_pages=100, max_pixels=64_000_000) -> list[Page]``
    ``source`` is ``bytes`` or a file path: a PDF (rendered with pypdfium2 at ``dpi``, RGB on white) or an
    image (a multi-frame TIFF gives one page per frame). ``pages`` selects pages, ``"1-3,7"`` or ``"5-"``.
    ``Page(number, image)``: 1-based page number, RGB ``PIL.Image``. Every problem (not a document,
    corrupt, encrypted, no pages, too many pages, a page over the pixel cap, a bad selection) raises
    ``DocumentError(message, code)``.

Running (``pipeline.py``)
    ``run_pages(manager, pages, template, kind, options=None) -> AsyncIterator[DocEvent]``
    ``manager`` is the ``ModelManager`` (anything with ``submit_group``); ``template`` an ``OcrRequest``
    whose prompt, sampling, vision settings and ``max_new_tokens`` (PER PAGE) apply to every page
    (``request_template(settings, model_id, prompt=None, max_new_tokens=None)`` builds one from the
    configured defaults); ``kind`` the model kind (``settings.entry(model_id).kind``) choosing the
    post-processor; ``options`` a ``DocumentOptions(output="markdown"|"raw"|"blocks", layout_images=False,
    figures=None)`` where ``figures(page_number, index, crop_image) -> link`` stores figure crops (default:
    JPEG data URLs inline). Events, in page order: ``PageDelta(page, text, first)`` (new text of the page in
    the chosen output, as it is generated), ``PageDone(result: PageResult)``, finally
    ``DocumentDone(result: DocumentResult)``. The pages run concurrently in the engine (one request against
    the queue limits, fair slot sharing); closing the iterator cancels every page. Engine errors are raised
    (``Overloaded``, ``QueueTimeout``, ``BadRequest`` naming the page, ...), a page that fails mid-way raises
    ``PageFailed``. ``run_jobs(manager, [PageJob(number, image, request)], kind, options)`` is the same for
    hand-made requests.

Post-processing (``postprocess/``: pure functions over model text)
    ``for_kind(kind) -> PostProcessor`` with ``process(text, width, height, figure=None) -> PageContent``
    and ``stable_length(text)``; ``register(kind, pp)`` adds a family (DeepSeek-OCR 2 reuses ``GROUNDING``).
    ``StreamCleaner`` turns a growing page text into clean-markdown deltas.

Result schema (``schema.py``, declared once): ``DocumentResult(model, pages)`` -> ``to_dict()`` (the JSON
of the API's ``document`` field), ``joined(raw=False)`` (the pages' text with ``<!-- page N -->`` markers),
``finish_reason`` (``length`` if any page hit its budget), summed ``prompt_tokens``/``completion_tokens``;
``PageResult`` (page, width, height, raw, markdown, blocks, finish_reason, usage, layout_image);
``Block(type, bbox, bbox_norm, text, figure)``.

Pictures (``render.py``): ``draw_layout(image, blocks) -> Image`` (boxes drawn and labelled),
``layout_png(image, blocks) -> bytes``, ``crop(image, box)``, ``data_url(image)``.
"""

from __future__ import annotations

from .pages import (
    DEFAULT_DPI,
    DEFAULT_MAX_PAGES,
    DPI_RANGE,
    DocumentError,
    Page,
    load_pages,
    parse_page_selection,
)
from .pipeline import (
    OUTPUT_FORMATS,
    DocEvent,
    DocumentDone,
    DocumentOptions,
    FigureSink,
    PageDelta,
    PageDone,
    PageFailed,
    PageJob,
    page_jobs,
    request_template,
    run_jobs,
    run_pages,
)
from .postprocess import PostProcessor, StreamCleaner, for_kind, register
from .render import crop, data_url, draw_layout, layout_png
from .schema import Block, DocumentResult, PageContent, PageResult, page_marker, page_prefix

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_MAX_PAGES",
    "DPI_RANGE",
    "OUTPUT_FORMATS",
    "Block",
    "DocEvent",
    "DocumentDone",
    "DocumentError",
    "DocumentOptions",
    "DocumentResult",
    "FigureSink",
    "Page",
    "PageContent",
    "PageDelta",
    "PageDone",
    "PageFailed",
    "PageJob",
    "PageResult",
    "PostProcessor",
    "StreamCleaner",
    "crop",
    "data_url",
    "draw_layout",
    "for_kind",
    "layout_png",
    "load_pages",
    "page_jobs",
    "page_marker",
    "page_prefix",
    "parse_page_selection",
    "register",
    "request_template",
    "run_jobs",
    "run_pages",
]
