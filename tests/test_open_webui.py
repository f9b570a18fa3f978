"""What Open WebUI sends: client metadata in the user text, "continue response", model choice."""

from __future__ import annotations

import httpx
import openai
import pytest
from fixtures.server import (
    DEFAULT_PROMPTS,
    RunningServer,
    data_url,
    expected_answer,
    png_bytes,
    reference_model,
)
from PIL import Image

from deepseek_ocr_server.api.messages import strip_client_metadata

PNG = png_bytes((30, 60, 90))
IMAGE = Image.open(__import__("io").BytesIO(PNG)).convert("RGB")
ATTACHED = (
    '<attached_files>\n<file type="file" id="4f1c" url="/api/v1/files/4f1c" content_type="image/png" '
    'name="page.png"/>\n</attached_files>\n\n'
)


def _parts(*texts: str) -> list[dict]:
    return [
        *({"type": "text", "text": t} for t in texts),
        {"type": "image_url", "image_url": {"url": data_url(PNG)}},
    ]


@pytest.fixture(scope="module")
def client(api_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.v1, api_key="x", max_retries=0)


def _ask(client: openai.OpenAI, messages: list[dict], **kw: object):  # noqa: ANN202
    return client.chat.completions.create(model="fake-a", messages=messages, max_tokens=40, **kw)


def test_strip_client_metadata() -> None:
    assert strip_client_metadata(ATTACHED) == ""
    assert strip_client_metadata(ATTACHED + "Read the table.") == "Read the table."
    assert strip_client_metadata('<file type="file" name="a.png"/>') == ""
    assert strip_client_metadata("keep <b>this</b> and a <filename>") == "keep <b>this</b> and a <filename>"


@pytest.mark.parametrize("shape", ["own part", "same part"])
def test_attached_files_block_is_not_prompt_text(client: openai.OpenAI, shape: str) -> None:
    parts = _parts(ATTACHED) if shape == "own part" else _parts(ATTACHED)
    r = _ask(client, [{"role": "user", "content": parts}])
    # an image with nothing but metadata gets the entry's default prompt
    assert r.choices[0].message.content == expected_answer("fake-a", DEFAULT_PROMPTS["fake-a"], [IMAGE], 40)
    parts = (
        _parts(ATTACHED, "Read the table.") if shape == "own part" else _parts(ATTACHED + "Read the table.")
    )
    r = _ask(client, [{"role": "user", "content": parts}])
    assert r.choices[0].message.content == expected_answer("fake-a", "Read the table.", [IMAGE], 40)
    assert (
        r.usage.prompt_tokens
        == reference_model("fake-a").prepare("Read the table.", [IMAGE]).num_prompt_tokens
    )


@pytest.mark.parametrize("stream", [False, True])
def test_continue_response_continues_the_partial_answer(client: openai.OpenAI, stream: bool) -> None:
    user = {"role": "user", "content": _parts("read")}
    partial = "the start of an answ"
    messages = [user, {"role": "assistant", "content": partial}]
    ref = reference_model("fake-a")
    prepared = ref.continue_answer(ref.prepare("read", [IMAGE]), partial)
    want = ref.expected_text(prepared, 40)
    full = _ask(client, [user]).choices[0].message.content
    if stream:
        chunks = list(_ask(client, messages, stream=True, stream_options={"include_usage": True}))
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        r = _ask(client, messages)
        got, usage = r.choices[0].message.content, r.usage
    assert got == want and got != full
    # the partial answer is part of the prompt, not repeated in the reply
    assert (
        usage.prompt_tokens
        == prepared.num_prompt_tokens
        == ref.prepare("read", [IMAGE]).num_prompt_tokens + len(partial.encode())
    )


def test_responses_continue_response(api_server: RunningServer) -> None:
    partial = "partial"
    body = {
        "model": "fake-a",
        "max_output_tokens": 40,
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "read"},
                    {"type": "input_image", "image_url": data_url(PNG)},
                ],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": partial}]},
        ],
    }
    r = httpx.post(api_server.v1 + "/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ref = reference_model("fake-a")
    want = ref.expected_text(ref.continue_answer(ref.prepare("read", [IMAGE]), partial), 40)
    assert r.json()["output"][0]["content"][0]["text"] == want


def test_assistant_before_the_last_user_message_is_history(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": _parts("read")},
    ]
    assert _ask(client, messages).choices[0].message.content == expected_answer("fake-a", "read", [IMAGE], 40)


@pytest.mark.parametrize("model_id", ["deepseek-ocr", "paddleocr-vl", "glm-ocr"])
def test_continue_answer_equals_decoding_the_partial_answer(
    request: pytest.FixtureRequest, model_id: str
) -> None:
    """Prefilling prompt + partial answer gives the logits that decoding the partial answer token by
    token after the prompt gives (positions included: the 3-D rope of PaddleOCR-VL and GLM-OCR)."""
    import torch
    from fixtures.server import REAL_VISION

    from deepseek_ocr_server.models import load_model
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings

    ckpt = {"deepseek-ocr": "deepseek_ckpt", "paddleocr-vl": "paddle_ckpt", "glm-ocr": "glm_ckpt"}[model_id]
    files = ModelFiles.from_dir(request.getfixturevalue(ckpt))
    model = load_model(model_id, files, device="cpu", dtype=torch.float32)
    prepared = model.prepare("read", [IMAGE], VisionSettings(**REAL_VISION))
    partial = "The table: 12 apples"
    ids = model.tokenizer.encode(partial, add_special_tokens=False).ids
    logits_a, _ = model.prefill(model.continue_answer(prepared, partial), 4)
    logits_b, cache = model.prefill(prepared, len(ids) + 4)
    for t in ids:
        logits_b = model.decode([t], [cache])[0]
    torch.testing.assert_close(logits_a, logits_b, atol=2e-4, rtol=2e-4)


def test_models_list_the_resident_model_first_with_states(api_server: RunningServer) -> None:
    http = httpx.Client(timeout=60)
    body = {"model": "fake-b", "messages": [{"role": "user", "content": _parts("read")}], "max_tokens": 2}
    assert http.post(api_server.v1 + "/chat/completions", json=body).status_code == 200  # fake-b resident
    http.post(api_server.v1 + "/chat/completions", json={**body, "model": "fake-broken"})  # marked failed
    assert http.post(api_server.v1 + "/chat/completions", json=body).status_code == 200
    data = http.get(api_server.v1 + "/models").json()["data"]
    assert data[0]["id"] == "fake-b" and data[0]["status"] == "ready", data
    states = {m["id"]: m["status"] for m in data}
    assert states["fake-broken"] == "failed" and states["fake-a"] == "available", states
    assert sorted(states) == sorted(["fake-a", "fake-b", "fake-slow", "fake-broken"])
    # back to fake-a: it is listed first again
    assert http.post(api_server.v1 + "/chat/completions", json={**body, "model": "fake-a"}).status_code == 200
    assert http.get(api_server.v1 + "/models").json()["data"][0]["id"] == "fake-a"
