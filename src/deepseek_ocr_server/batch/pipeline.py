"""The batch command's view of the document pipeline: open a document, render its pages, turn a page's
raw model text into its outputs, assemble a document. (Temporary minimal version until the shared
``documents`` package lands; replaced by calls into it.)"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from .outputs import DocumentOutput

DEFAULT_DPI = 144


class DocumentError(Exception):
    """A document that cannot be read (corrupt, encrypted, not an image or PDF)."""


class PageSource:
    def __init__(self, data: bytes, name: str, dpi: int) -> None:
        self.dpi = dpi
        self._pdf: Any = None
        self._frames: list[Image.Image] = []
        if data[:5] == b"%PDF-":
            import pypdfium2 as pdfium

            try:
                self._pdf = pdfium.PdfDocument(data)
            except pdfium.PdfiumError as exc:
                raise DocumentError(f"not a readable PDF ({exc})") from None
            self.count = len(self._pdf)
        else:
            try:
                img = Image.open(io.BytesIO(data))
                self._frames = [
                    ImageOps.exif_transpose(f.convert("RGB")) for f in ImageSequence.Iterator(img)
                ]
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DocumentError(f"not an image or PDF ({exc})") from None
            self.count = len(self._frames)
        if self.count == 0:
            raise DocumentError("the document has no pages")

    def render(self, index: int) -> Image.Image:
        if self._pdf is not None:
            page = self._pdf[index]
            return page.render(scale=self.dpi / 72).to_pil().convert("RGB")
        return self._frames[index]

    def close(self) -> None:
        if self._pdf is not None:
            self._pdf.close()


def open_document(data: bytes, name: str, dpi: int = DEFAULT_DPI) -> PageSource:
    return PageSource(data, name, dpi)


@dataclass
class PageOut:
    index: int
    width: int
    height: int
    raw: str
    markdown: str
    finish_reason: str
    blocks: list[dict[str, Any]] = field(default_factory=list)


def page_result(
    kind: str, raw: str, image: Image.Image, index: int, finish_reason: str, boxes: bool
) -> PageOut:
    return PageOut(index, image.width, image.height, raw, raw, finish_reason)


def assemble(
    name: str, source: Path | None, model_id: str, pages: list[PageOut], fmt: str, boxes: bool, image_dir: str
) -> DocumentOutput:
    if fmt == "raw":
        return DocumentOutput(main_text="\n\n".join(p.raw for p in pages))
    md = "".join((f"\n\n<!-- page {p.index + 1} -->\n\n" if p.index else "") + p.markdown for p in pages)
    obj = {
        "source": name,
        "model": model_id,
        "pages": [
            {"page": p.index + 1, "width": p.width, "height": p.height, "blocks": p.blocks} for p in pages
        ],
    }
    return DocumentOutput(main_text=md, json_text=json.dumps(obj, ensure_ascii=False, indent=2))
