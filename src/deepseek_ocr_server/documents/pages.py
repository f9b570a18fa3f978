"""Documents -> page images: PDFs rendered with pypdfium2, multi-frame images (TIFF) split into frames.

Everything here is blocking (call it from a worker thread) and every failure is a :class:`DocumentError`
with a message a user can act on: not a document, truncated or corrupt, password-protected, zero pages,
a page whose render exceeds the pixel cap, more pages than the cap, a bad page selection.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageSequence, UnidentifiedImageError

from ..config import PDF_DPI_RANGE as DPI_RANGE
from ..config import ServerSettings
from ..imaging import normalise

#: the official DeepSeek-OCR PDF script renders at 144 DPI; the config (``[server] pdf_dpi``, ``max_pages``,
#: ``max_image_pixels``) and a request can change these
DEFAULT_DPI: int = ServerSettings.pdf_dpi
DEFAULT_MAX_PAGES: int = ServerSettings.max_pages
DEFAULT_MAX_PIXELS: int = ServerSettings.max_image_pixels

# pdfium is not thread-safe: one call into it at a time, whichever request asks
_PDFIUM_LOCK = threading.Lock()


class DocumentError(ValueError):
    """A document that cannot be turned into pages; ``code`` is a stable machine-readable reason."""

    def __init__(self, message: str, code: str = "invalid_document") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Page:
    number: int  # 1-based page (or frame) number in its source document
    image: Image.Image  # RGB, no alpha


def is_pdf(data: bytes) -> bool:
    """PDF signature within the first KiB (what PDF readers accept)."""
    return b"%PDF-" in data[:1024]


def parse_page_selection(spec: str | None, count: int) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]`` (1-based, ascending, duplicates merged); ``None``/``""`` = all.

    ``"5-"`` runs to the last page. A page beyond ``count`` is an error naming the document's length."""
    if spec is None or not spec.strip():
        return list(range(1, count + 1))
    chosen: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d*))?", item)
        if not m:
            raise DocumentError(
                f'invalid page selection {spec!r}: use page numbers and ranges such as "1-3,7"',
                "invalid_pages",
            )
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else (int(m.group(2)) if m.group(2) else count)
        if lo < 1 or hi < lo:
            raise DocumentError(f"invalid page range {item!r} in {spec!r}", "invalid_pages")
        if hi > count:
            raise DocumentError(
                f"page selection {spec!r} asks for page {hi}, but the document has {count} page"
                f"{'s' if count != 1 else ''}",
                "invalid_pages",
            )
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def check_dpi(dpi: int) -> int:
    lo, hi = DPI_RANGE
    if not isinstance(dpi, int) or isinstance(dpi, bool) or not lo <= dpi <= hi:
        raise DocumentError(f"dpi must be an integer in {lo}..{hi}, got {dpi!r}", "invalid_value")
    return dpi


def _check_count(selected: int, max_pages: int) -> None:
    if selected > max_pages:
        raise DocumentError(
            f"the document has {selected} pages to read, more than this server's limit of {max_pages} pages per "
            "request; select fewer with the 'pages' option (e.g. \"1-10\")",
            "too_many_pages",
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    out = normalise(img)
    out.load()
    return out


def pdf_pages(
    data: bytes,
    *,
    dpi: int = DEFAULT_DPI,
    pages: str | None = None,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Page]:
    """Render the selected pages of a PDF at ``dpi`` (RGB, white background, annotations drawn)."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    check_dpi(dpi)
    scale = dpi / 72.0
    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            # pdfium's error code is process-global and not reset by every failure: trust a password
            # code only for a file that declares encryption
            code = getattr(exc, "err_code", None)
            if code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY) and b"/Encrypt" in data:
                raise DocumentError(
                    "the PDF is password-protected (encrypted); send an unprotected copy",
                    "document_encrypted",
                ) from None
            raise DocumentError(
                "the PDF is corrupt, truncated or has no pages and cannot be opened"
                f" ({str(exc).removeprefix('Failed to load document ')})"
            ) from None
        try:
            count = len(pdf)
            if count < 1:
                raise DocumentError("the PDF has no pages", "empty_document")
            selected = parse_page_selection(pages, count)
            _check_count(len(selected), max_pages)
            out: list[Page] = []
            for number in selected:
                try:
                    page = pdf[number - 1]
                except pdfium.PdfiumError as exc:
                    raise DocumentError(f"page {number} of the PDF cannot be read ({exc})") from None
                try:
                    w_pt, h_pt = page.get_size()
                    w, h = (
                        math.ceil(w_pt * scale - 1e-6),
                        math.ceil(h_pt * scale - 1e-6),
                    )  # as pdfium sizes it
                    if w < 1 or h < 1:
                        raise DocumentError(f"page {number} of the PDF has no area")
                    if w * h > max_pixels:
                        raise DocumentError(
                            f"page {number} renders at {dpi} DPI to {w}x{h} = {w * h} pixels, more than the limit "
                            f"of {max_pixels}; ask for a lower 'dpi'",
                            "page_too_large",
                        )
                    bitmap = page.render(scale=scale, draw_annots=True, fill_color=(255, 255, 255, 255))
                    img = bitmap.to_pil()
                    img = img.convert("RGB") if img.mode != "RGB" else img.copy()
                    bitmap.close()
                finally:
                    page.close()
                out.append(Page(number, img))
            return out
        finally:
            pdf.close()


def image_pages(
    data: bytes,
    *,
    pages: str | None = None,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Page]:
    """Every frame of an image (a multi-page TIFF gives one page per frame; other images one page)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            count = getattr(img, "n_frames", 1)
            selected = parse_page_selection(pages, count)
            _check_count(len(selected), max_pages)
            want = set(selected)
            out: list[Page] = []
            for i, frame in enumerate(ImageSequence.Iterator(img), start=1):
                if i not in want:
                    continue
                w, h = frame.size
                if w < 1 or h < 1:
                    raise DocumentError(f"frame {i} of the image has no pixels")
                if w * h > max_pixels:
                    raise DocumentError(
                        f"frame {i} is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}",
                        "page_too_large",
                    )
                frame.load()
                out.append(Page(i, _to_rgb(frame.copy())))
            if len(out) != len(selected):
                raise DocumentError(f"the image has fewer frames than it declares ({len(out)} of {count})")
            return out
    except DocumentError:
        raise
    except UnidentifiedImageError:
        raise DocumentError("the file is neither a PDF nor a supported image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DocumentError(
            "the image exceeds the pixel limit (decompression bomb guard)", "page_too_large"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise DocumentError(f"the image could not be decoded: {exc}") from None


def load_pages(
    source: bytes | str | os.PathLike[str],
    *,
    dpi: int = DEFAULT_DPI,
    pages: str | None = None,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Page]:
    """A PDF or image (bytes or a file path) -> its selected pages, in page order (blocking)."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise DocumentError(
                f"cannot read {os.fspath(source)!r}: {exc.strerror or exc}", "unreadable_file"
            ) from None
    if not data:
        raise DocumentError("the document is empty (0 bytes)", "empty_document")
    if is_pdf(data):
        return pdf_pages(data, dpi=dpi, pages=pages, max_pages=max_pages, max_pixels=max_pixels)
    return image_pages(data, pages=pages, max_pages=max_pages, max_pixels=max_pixels)
