"""The batch command's use of the shared document pipeline (``deepseek_ocr_server.documents``).

Nothing here renders, post-processes or defines a schema of its own: pages come from
``documents.load_pages``, clean markdown and blocks from the family's post-processor
(``documents.for_kind``), the JSON from ``DocumentResult.to_dict()`` (the API's ``document`` field), the
boxes pictures from ``documents.layout_png``. What is batch-specific: counting a document's pages up
front (for the progress bar), loading the pages a few at a time (memory stays bounded on long PDFs),
storing figure crops as files, and turning a result into the bytes of the output files.
"""

from __future__ import annotations

import io
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from PIL import Image

from ..documents import (
    DEFAULT_DPI,
    DPI_RANGE,
    DocumentError,
    DocumentResult,
    Page,
    PageResult,
    crop,
    data_url,
    for_kind,
    layout_png,
    load_pages,
    parse_page_selection,
)
from ..documents.pages import is_pdf
from .outputs import DocumentOutput

__all__ = [
    "DEFAULT_DPI",
    "boxes_png",
    "DPI_RANGE",
    "DocumentError",
    "FigureStore",
    "count_pages",
    "document_output",
    "load_chunk",
    "page_from_text",
    "selected_pages",
]

#: a CLI run reads every page it is given: no per-request page cap as on the server
NO_PAGE_CAP = 10**9


def count_pages(data: bytes) -> int:
    """The number of pages (PDF) or frames (image) without rendering any; raises :class:`DocumentError`
    (the pipeline's own reason) when the document cannot be read."""
    n = 0
    try:
        if is_pdf(data):
            import pypdfium2 as pdfium

            pdf = pdfium.PdfDocument(data)
            try:
                n = len(pdf)
            finally:
                pdf.close()
        else:
            with Image.open(io.BytesIO(data)) as img:
                n = int(getattr(img, "n_frames", 1))
    except Exception:  # noqa: BLE001 - load_pages below names the problem
        n = 0
    if n < 1:
        return len(load_pages(data, max_pages=NO_PAGE_CAP))  # raises DocumentError with the reason
    return n


def selected_pages(spec: str | None, count: int) -> list[int]:
    """``--pages`` (``"1-3,7"``, ``"5-"``) against a document of ``count`` pages; DocumentError if it
    asks for a page the document does not have."""
    return parse_page_selection(spec, count)


def load_chunk(data: bytes, numbers: list[int], dpi: int, max_pixels: int) -> list[Page]:
    """Render just these pages (1-based numbers, ascending)."""
    spec = ",".join(str(n) for n in numbers)
    return load_pages(data, dpi=dpi, pages=spec, max_pages=NO_PAGE_CAP, max_pixels=max_pixels)


class FigureStore:
    """The figure sink of one document: each crop becomes ``<name>_images/page-0001-1.jpg``, linked
    from the markdown and the blocks by that relative path. With ``folder_name=None`` (markdown to
    stdout) crops are linked inline as JPEG data URLs, as the API does."""

    def __init__(self, folder_name: str | None) -> None:
        self.folder = folder_name
        self.files: dict[str, bytes] = {}

    def __call__(self, page: int, index: int, image: Image.Image) -> str | None:
        rgb = image.convert("RGB")
        if self.folder is None:
            return data_url(rgb, "JPEG", quality=90)
        name = f"page-{page:04d}-{index}.jpg"
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=90)
        self.files[name] = buf.getvalue()
        return urllib.parse.quote(f"{self.folder}/{name}")


def page_from_text(
    kind: str,
    page: Page,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    figures: Callable[[int, int, Image.Image], str | None],
) -> PageResult:
    """A page result from text generated elsewhere (``--server``): the family's post-processor over it,
    exactly as the in-process pipeline does for the engine's text."""
    count = 0

    def link(box: tuple[int, int, int, int]) -> str | None:
        nonlocal count
        count += 1
        return figures(page.number, count, crop(page.image, box))

    w, h = page.image.size
    content = for_kind(kind).process(text, w, h, link)
    return PageResult(
        page=page.number, width=w, height=h, raw=text, content=content,
        finish_reason="length" if finish_reason == "length" else "stop",
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
    )  # fmt: skip


def boxes_png(page: Page, result: PageResult) -> bytes:
    return layout_png(page.image, result.blocks)


def document_output(
    result: DocumentResult, fmt: str, figures: dict[str, bytes], boxes: dict[int, bytes]
) -> DocumentOutput:
    """The bytes of a document's output files (see :mod:`.outputs`)."""
    if fmt == "raw":
        return DocumentOutput(main_text=result.joined(raw=True))
    doc: dict[str, Any] = result.to_dict()
    return DocumentOutput(
        main_text=result.joined(),
        json_text=json.dumps(doc, ensure_ascii=False, indent=2) + "\n",
        images=dict(figures),
        boxes={f"page-{n:04d}.png": png for n, png in sorted(boxes.items())},
    )
