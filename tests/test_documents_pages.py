"""Documents -> pages: real PDFs and TIFFs made in the tests, every kind of bad document."""

from __future__ import annotations

import io

import pytest
from fixtures.documents import empty_pdf, encrypted_pdf, make_pdf, page_image, tiff
from PIL import Image

from deepseek_ocr_server.documents import DocumentError, load_pages, parse_page_selection


def test_pdf_pages_render_at_144_dpi_by_default_in_rgb() -> None:
    data = make_pdf(3, [(160, 220), (200, 100), (120, 120)])
    pages = load_pages(data)
    assert [p.number for p in pages] == [1, 2, 3]
    assert [p.image.size for p in pages] == [(320, 440), (400, 200), (240, 240)]  # 2x of 72 DPI
    assert all(p.image.mode == "RGB" for p in pages)
    # the content is there: the dark title bar of page 1 at the top, white margins
    first = pages[0].image
    assert first.getpixel((160, 30))[0] < 100 and first.getpixel((2, 2)) == (255, 255, 255)
    assert load_pages(data, dpi=72)[0].image.size == (160, 220)


def test_page_selection_and_paths(tmp_path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(make_pdf(5))
    assert [p.number for p in load_pages(path, pages="1-2,5")] == [1, 2, 5]
    assert [p.number for p in load_pages(str(path), pages="4-")] == [4, 5]
    assert parse_page_selection("3, 1-2,2", 4) == [1, 2, 3]
    assert parse_page_selection(None, 3) == [1, 2, 3]
    for bad in ("0", "2-1", "a", "1,,2", "1-3-4"):
        with pytest.raises(DocumentError) as exc:
            parse_page_selection(bad, 4)
        assert exc.value.code == "invalid_pages"
    with pytest.raises(DocumentError, match="has 5 pages"):
        load_pages(path, pages="6")
    with pytest.raises(DocumentError) as exc:
        load_pages(tmp_path / "missing.pdf")
    assert exc.value.code == "unreadable_file"


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (encrypted_pdf(), "document_encrypted", "password"),
        (empty_pdf(), "invalid_document", "no pages"),
        (make_pdf(2)[:400], "invalid_document", "corrupt, truncated"),
        (b"%PDF-1.7\n" + b"\x00garbage" * 50, "invalid_document", "corrupt"),
        (b"just some text, not a document", "invalid_document", "neither a PDF nor"),
        (b"", "empty_document", "empty"),
    ],
)
def test_bad_documents_get_clear_errors(data: bytes, code: str, words: str) -> None:
    with pytest.raises(DocumentError) as exc:
        load_pages(data)
    assert exc.value.code == code and words in exc.value.message


def test_page_and_pixel_caps() -> None:
    data = make_pdf(3)
    with pytest.raises(DocumentError) as exc:
        load_pages(data, max_pages=2)
    assert exc.value.code == "too_many_pages" and "limit of 2 pages" in exc.value.message
    assert len(load_pages(data, max_pages=2, pages="2-3")) == 2  # a selection within the cap is fine
    with pytest.raises(DocumentError) as exc:
        load_pages(data, max_pixels=100_000)  # 320 x 440 = 140,800 pixels at 144 DPI
    assert exc.value.code == "page_too_large" and "dpi" in exc.value.message
    assert load_pages(data, max_pixels=100_000, dpi=100)[0].image.size == (223, 306)
    for dpi in (10, 601):
        with pytest.raises(DocumentError, match="dpi must be"):
            load_pages(data, dpi=dpi)


def test_multi_page_tiff_gives_one_page_per_frame() -> None:
    frames = [page_image(0), page_image(1, (100, 80)).convert("L"), page_image(2).convert("RGBA")]
    data = tiff(frames)
    pages = load_pages(data)
    assert [p.number for p in pages] == [1, 2, 3]
    assert [p.image.size for p in pages] == [(160, 220), (100, 80), (160, 220)]
    assert all(p.image.mode == "RGB" for p in pages)
    assert pages[0].image.tobytes() == frames[0].tobytes()
    assert [p.number for p in load_pages(data, pages="2")] == [2]
    with pytest.raises(DocumentError) as exc:
        load_pages(data, max_pages=2)
    assert exc.value.code == "too_many_pages"
    with pytest.raises(DocumentError) as exc:
        load_pages(data, max_pixels=1000)
    assert exc.value.code == "page_too_large"


def test_a_plain_image_is_one_page() -> None:
    buf = io.BytesIO()
    page_image(4).save(buf, "PNG")
    pages = load_pages(buf.getvalue())
    assert len(pages) == 1 and pages[0].image.tobytes() == page_image(4).tobytes()
    assert isinstance(pages[0].image, Image.Image)
