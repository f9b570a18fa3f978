"""Documents through the HTTP API: PDFs as chat ``file`` parts and Responses ``input_file`` parts
(file_data and file_url), multi-page TIFFs, output formats, the structured ``document`` field, every kind
of bad document, cancellation; and a 2-page PDF through both APIs on the tiny real checkpoints."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import openai
import pytest
from fixtures.documents import encrypted_pdf, make_pdf, page_image, tiff
from fixtures.server import REAL_VISION, ImageServer, RunningServer, expected_answer
from PIL import Image

from deepseek_ocr_server.documents import load_pages, page_marker
from deepseek_ocr_server.documents.postprocess import for_kind
from deepseek_ocr_server.documents.render import figure_data_url


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def file_part(data: bytes, name: str = "doc.pdf", mime: str = "application/pdf") -> dict:
    return {"type": "file", "file": {"filename": name, "file_data": f"data:{mime};base64,{b64(data)}"}}


def chat(server: RunningServer, parts: list[dict], **extra) -> httpx.Response:
    body = {"model": "fake-a", "messages": [{"role": "user", "content": parts}], **extra}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)


def split_pages(text: str, numbers: list[int]) -> list[str]:
    """The document's text -> each page's text (the inverse of the page markers)."""
    out = []
    for i, n in enumerate(numbers):
        head = ("" if i == 0 else "\n\n") + page_marker(n) + "\n\n"
        assert text.startswith(head), (text[:80], head)
        text = text[len(head) :]
        nxt = ("\n\n" + page_marker(numbers[i + 1]) + "\n\n") if i + 1 < len(numbers) else None
        cut = text.index(nxt) if nxt else len(text)
        out.append(text[:cut])
        text = text[cut:]
    return out


PDF = make_pdf(3, [(160, 220), (200, 100), (120, 150)])
PAGES = load_pages(PDF)  # rendered as the server renders them (144 DPI)


def test_pdf_in_chat_pages_in_order_answer_per_page_usage_summed(api_server: RunningServer) -> None:
    r = chat(api_server, [{"type": "text", "text": "read it"}, file_part(PDF)], output_format="raw")
    assert r.status_code == 200, r.text
    out = r.json()
    texts = split_pages(out["choices"][0]["message"]["content"], [1, 2, 3])
    assert texts == [expected_answer("fake-a", "read it", [p.image]) for p in PAGES]
    assert texts[0] != texts[1]
    assert "document" not in out
    usage = out["usage"]
    assert usage["completion_tokens"] == sum(len(t) + 1 for t in texts)  # letters + EOS per page
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the fake kind has no post-processor: markdown output is the same text; "pages" selects pages
    r2 = chat(api_server, [{"type": "text", "text": "read it"}, file_part(PDF)], pages="3,1")
    assert split_pages(r2.json()["choices"][0]["message"]["content"], [1, 3]) == [texts[0], texts[2]]


def test_streamed_document_with_structured_blocks_and_layout_images(api_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=api_server.v1, api_key="x", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": [file_part(PDF)]}]
    full = client.chat.completions.create(
        model="fake-a",
        messages=msgs,
        max_tokens=5,
        extra_body={"output_format": "blocks", "layout_images": True},
    )
    assert full.choices[0].finish_reason == "length"  # every page hit max_tokens=5 (a per-page budget)
    assert full.usage.completion_tokens == 3 * 5
    doc = full.model_extra["document"]
    assert doc["object"] == "ocr.document" and doc["model"] == "fake-a"
    assert [(p["page"], p["width"], p["height"]) for p in doc["pages"]] == [
        (1, 320, 440),
        (2, 400, 200),
        (3, 240, 300),
    ]
    page = doc["pages"][0]
    assert page["finish_reason"] == "length" and page["usage"]["completion_tokens"] == 5
    assert page["blocks"] == [
        {"type": "text", "bbox": None, "bbox_norm": None, "text": page["markdown"].strip(), "figure": None}
    ]
    png = base64.b64decode(page["layout_image"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (320, 440)

    chunks = list(
        client.chat.completions.create(
            model="fake-a", messages=msgs, max_tokens=5, stream=True, extra_body={"output_format": "blocks"}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.model_extra["document"]["pages"][2]["page"] == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]


def test_pdf_in_responses_as_file_data_and_file_url(
    api_server: RunningServer, image_server: ImageServer
) -> None:
    client = openai.OpenAI(base_url=api_server.v1, api_key="x", max_retries=0, timeout=120)
    image_server.files["/doc.pdf"] = PDF
    expected = None
    for source in (
        {"file_data": f"data:application/pdf;base64,{b64(PDF)}"},
        {"file_url": image_server.url("/doc.pdf")},
    ):
        inp = [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "read it"},
                    {"type": "input_file", "filename": "doc.pdf", **source},
                ],
            }
        ]
        r = client.responses.create(model="fake-a", input=inp, extra_body={"output_format": "raw"})
        assert r.status == "completed"
        texts = split_pages(r.output_text, [1, 2, 3])
        assert texts == [expected_answer("fake-a", "read it", [p.image]) for p in PAGES]
        with client.responses.stream(
            model="fake-a", input=inp, extra_body={"output_format": "blocks"}
        ) as stream:
            deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            final = stream.get_final_response()
        assert deltas == final.output_text == r.output_text
        assert len(final.model_extra["document"]["pages"]) == 3
        expected = expected or r.usage.output_tokens
        assert r.usage.output_tokens == expected


def test_multi_page_tiff_as_an_image(api_server: RunningServer) -> None:
    frames = [page_image(0), page_image(1, (90, 70)), page_image(2)]
    url = "data:image/tiff;base64," + b64(tiff(frames))
    r = chat(
        api_server, [{"type": "text", "text": "read it"}, {"type": "image_url", "image_url": {"url": url}}]
    )
    assert r.status_code == 200, r.text
    texts = split_pages(r.json()["choices"][0]["message"]["content"], [1, 2, 3])
    assert texts == [expected_answer("fake-a", "read it", [f]) for f in frames]


@pytest.mark.parametrize(
    ("parts", "extra", "code", "param"),
    [
        ([file_part(encrypted_pdf())], {}, "document_encrypted", "messages[0].content[0].file.file_data"),
        ([file_part(PDF[:300])], {}, "invalid_document", "messages[0].content[0].file.file_data"),
        ([file_part(b"not a pdf at all", "a.pdf")], {}, "invalid_document", None),
        ([file_part(make_pdf(101, [(30, 30)] * 101))], {}, "too_many_pages", None),
        (
            [file_part(make_pdf(1, [(1500, 1500)]))],
            {},
            "page_too_large",
            None,
        ),  # 9 M pixels > the 4 M test cap
        ([file_part(PDF)], {"pages": "2-9"}, "invalid_pages", "pages"),
        ([file_part(PDF)], {"dpi": 1000}, None, "dpi"),
        ([file_part(PDF), file_part(PDF)], {}, "too_many_documents", None),
        (
            [{"type": "file", "file": {"file_id": "file-123"}}],
            {},
            "invalid_file",
            "messages[0].content[0].file.file_id",
        ),
        ([{"type": "file", "file": {"file_data": "%%%"}}], {}, "invalid_base64", None),
    ],
)
def test_bad_documents_get_a_clear_400(api_server: RunningServer, parts, extra, code, param) -> None:  # noqa: ANN001
    r = chat(api_server, parts, **extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert err["message"]
    if code == "too_many_pages":
        assert "100" in err["message"]
    ok = chat(api_server, [{"type": "text", "text": "read it"}, file_part(PDF)])  # the server keeps serving
    assert ok.status_code == 200


def test_cancelling_a_document_stream_cancels_every_page(api_server: RunningServer) -> None:
    body = {"model": "fake-slow", "stream": True, "messages": [{"role": "user", "content": [file_part(PDF)]}]}
    with httpx.stream("POST", api_server.v1 + "/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                seen += 1
                if seen >= 3:
                    break  # page 1 is streaming; pages 2 and 3 wait for the only slot
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = api_server.manager.status()
        if status.running == 0 and status.queued == 0:
            break
        time.sleep(0.05)
    status = api_server.manager.status()
    assert status.running == 0 and status.queued == 0
    assert api_server.model().live_caches == 0
    ok = chat(api_server, [{"type": "text", "text": "read it"}, file_part(PDF)])
    assert ok.status_code == 200


def test_real_models_two_page_pdf_through_both_apis_raw_equals_page_images(
    real_server: RunningServer,
) -> None:
    pdf = make_pdf(2, [(120, 160), (160, 120)])
    pages = load_pages(pdf)
    client = openai.OpenAI(base_url=real_server.v1, api_key="x", max_retries=0, timeout=300)

    def png_url(img: Image.Image) -> str:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return "data:image/png;base64," + b64(buf.getvalue())

    for model in ("deepseek-ocr", "paddleocr-vl"):
        per_page = [
            client.chat.completions.create(
                model=model,
                max_tokens=6,
                extra_body={"output_format": "raw", **REAL_VISION},
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": png_url(p.image)}}],
                    }
                ],
            )
            .choices[0]
            .message.content
            for p in pages
        ]
        chat_out = client.chat.completions.create(
            model=model,
            max_tokens=6,
            extra_body={"output_format": "raw", **REAL_VISION},
            messages=[{"role": "user", "content": [file_part(pdf)]}],
        )
        assert split_pages(chat_out.choices[0].message.content, [1, 2]) == per_page, model
        resp = client.responses.create(
            model=model,
            max_output_tokens=6,
            extra_body={"output_format": "blocks", **REAL_VISION},
            input=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_file",
                            "filename": "d.pdf",
                            "file_data": f"data:application/pdf;base64,{b64(pdf)}",
                        }
                    ],
                }
            ],
        )
        doc = resp.model_extra["document"]
        pp = for_kind(model)
        clean = [
            pp.process(
                raw, p.image.width, p.image.height, lambda box, im=p.image: figure_data_url(im, box)
            ).markdown
            for raw, p in zip(per_page, pages, strict=True)
        ]
        assert [p["markdown"] for p in doc["pages"]] == clean, model
        assert split_pages(resp.output_text, [1, 2]) == clean
        assert resp.usage.output_tokens == chat_out.usage.completion_tokens


def test_open_webui_external_extraction_endpoint(
    api_server: RunningServer, strict_server: RunningServer
) -> None:
    r = httpx.put(
        api_server.base_url + "/process",
        content=PDF,
        headers={"Content-Type": "application/pdf", "X-Filename": "my%20doc.pdf"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    prompt = api_server.settings.default_prompt("fake-a")
    assert split_pages(out["page_content"], [1, 2, 3]) == [
        expected_answer("fake-a", prompt, [p.image]) for p in PAGES
    ]
    assert out["metadata"]["source"] == "my doc.pdf" and out["metadata"]["pages"] == 3
    r = httpx.put(api_server.base_url + "/process?model=fake-b", content=PDF, timeout=120)
    assert r.json()["metadata"]["model"] == "fake-b"
    bad = httpx.put(api_server.base_url + "/process", content=encrypted_pdf(), timeout=120)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "document_encrypted"
    # the API key guards it like /v1
    assert httpx.put(strict_server.base_url + "/process", content=PDF, timeout=120).status_code == 401


def test_file_urls_go_through_the_guarded_fetcher(
    strict_server: RunningServer, image_server: ImageServer
) -> None:
    from fixtures.server import API_KEY

    image_server.files["/doc.pdf"] = PDF
    body = {
        "model": "fake-a",
        "input": [
            {"role": "user", "content": [{"type": "input_file", "file_url": image_server.url("/doc.pdf")}]}
        ],
    }
    r = httpx.post(
        strict_server.v1 + "/responses", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "image_url_forbidden" and err["param"] == "input[0].content[0].file_url"
