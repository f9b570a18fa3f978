"""Error text is for the people who read it: short, no server paths or admin flags for chat users (the
details go to the server log and to /health for the operator), limits in human units, and a plain
notice for a message without an image."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.testclient import TestClient
from fixtures.server import API_KEY, RunningServer, data_url, png_bytes

from deepseek_ocr_server.api.app import create_app

LEAKS = re.compile(r"(/[\w.-]+){2,}|--[a-z]|[A-Z]:\\\\|\.json|\.safetensors|HF_|Error:")


def _chat(model: str = "fake-a", **kw: object) -> dict:
    parts = [
        {"type": "text", "text": "read"},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
    ]
    return {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 2, **kw}


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    with httpx.Client(timeout=60) as c:
        yield c


def test_failed_model_error_has_no_paths(api_server: RunningServer, http: httpx.Client) -> None:
    for stream in (False, True):
        r = http.post(api_server.v1 + "/chat/completions", json=_chat("fake-broken", stream=stream))
        assert r.status_code == 503, r.text
        msg = r.json()["error"]["message"]
        assert "fake-broken" in msg and not LEAKS.search(msg), msg
    # the operator on loopback still sees the reason in /health
    health = http.get(api_server.base_url + "/health").json()
    assert "configured to fail" in health["failed"]["fake-broken"]


def test_health_hides_reasons_from_remote_clients(api_server: RunningServer, http: httpx.Client) -> None:
    http.post(api_server.v1 + "/chat/completions", json=_chat("fake-broken"))  # make sure it is marked failed
    client = TestClient(create_app(api_server.manager, api_server.settings))  # its client is not loopback
    body = client.get("/health").json()
    assert body["failed"] == {"fake-broken": "failed to load"} and not LEAKS.search(str(body)), body


def test_health_reasons_with_the_api_key(strict_server: RunningServer) -> None:
    with httpx.Client(timeout=60) as http:
        http.post(
            strict_server.v1 + "/chat/completions",
            json=_chat("fake-broken"),
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    client = TestClient(create_app(strict_server.manager, strict_server.settings))
    assert client.get("/health").json()["failed"] == {"fake-broken": "failed to load"}
    body = client.get("/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert "configured to fail" in body["failed"]["fake-broken"]


def test_limits_in_human_units(
    strict_server: RunningServer, api_server: RunningServer, http: httpx.Client
) -> None:
    big = data_url(b"\x89PNG" + b"\0" * (400 * 1024))
    r = http.post(
        strict_server.v1 + "/chat/completions",
        json={
            **_chat(),
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}],
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 413 and "256 KiB" in r.json()["error"]["message"], r.text
    huge = data_url(png_bytes(size=(2100, 2000)))  # 4.2 megapixels, the test limit is 4
    r = http.post(
        api_server.v1 + "/chat/completions",
        json={
            **_chat(),
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge}}]}],
        },
    )
    assert r.status_code == 400 and "4 megapixels" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    ("text", "marker"),
    [("What is the capital of France?", "attach an image"), ("请问法国的首都是哪里？", "图片")],
)
def test_text_only_notice_is_for_end_users(
    api_server: RunningServer, http: httpx.Client, text: str, marker: str
) -> None:
    r = http.post(
        api_server.v1 + "/chat/completions",
        json={"model": "fake-a", "messages": [{"role": "user", "content": text}]},
    )
    notice = r.json()["choices"][0]["message"]["content"]
    assert marker in notice and not re.search(r"image_url|input_image|data:|http", notice), notice
