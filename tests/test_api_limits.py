"""Admission accounting, strict request types, readiness, the OpenAPI schema and refused OpenAI options."""

from __future__ import annotations

import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from fixtures.server import RunningServer, data_url, png_bytes
from test_engine_scheduler import manager_for, req, run

from deepseek_ocr_server.api.app import create_app
from deepseek_ocr_server.engine.manager import ModelManager, ModelUnavailable, Overloaded
from deepseek_ocr_server.models.base import ModelLoadError
from deepseek_ocr_server.testing.fake import FakeOcrModel

PARTS = [{"type": "text", "text": "read"}, {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]


def _chat(**kw: object) -> dict:
    return {"model": "fake-a", "messages": [{"role": "user", "content": PARTS}], "max_tokens": 2, **kw}


def _accepted_in_a_burst(max_running: int, max_queued: int) -> int:
    """Submit requests while the worker cannot admit any (its model load is held); count the accepted."""
    gate = threading.Event()
    mgr = manager_for(
        {"a": FakeOcrModel(name="a")}, gate=gate, max_running=max_running, max_queued=max_queued
    )
    accepted = 0

    async def main() -> None:
        nonlocal accepted
        streams = []
        for _ in range(max_running + max_queued + 3):
            try:
                streams.append(mgr.submit(req("x")))
                accepted += 1
            except Overloaded:
                pass
        gate.set()
        for s in streams:
            async for _ in s:
                pass

    run(main())
    run(mgr.shutdown())
    return accepted


@pytest.mark.parametrize(("max_running", "max_queued"), [(2, 3), (1, 0), (3, 0)])
def test_a_burst_gets_max_running_plus_max_queued(max_running: int, max_queued: int) -> None:
    assert _accepted_in_a_burst(max_running, max_queued) == max_running + max_queued


def test_max_queued_zero_serves_an_idle_server() -> None:
    mgr = manager_for({"a": FakeOcrModel(name="a")}, max_running=1, max_queued=0)

    async def main() -> None:
        for _ in range(3):  # one after the other: each finds the slot free
            events = [ev async for ev in mgr.submit(req("x"))]
            assert events

    run(main())
    run(mgr.shutdown())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "10"),
        ("max_tokens", True),
        ("max_tokens", 2.5),
        ("temperature", "0.5"),
        ("top_p", True),
        ("seed", "1"),
        ("max_completion_tokens", "3"),
        ("top_k", False),
    ],
)
def test_numbers_are_not_coerced(api_server: RunningServer, field: str, value: object) -> None:
    r = httpx.post(api_server.v1 + "/chat/completions", json=_chat(**{field: value}), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = httpx.post(
        api_server.v1 + "/responses",
        json={"model": "fake-a", "input": "x", "max_output_tokens": "5"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens", r.text


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        (
            "/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ("/chat/completions", {"logprobs": True}, "logprobs"),
        ("/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/responses", {"text": {"format": {"type": "json_object"}}}, "text.format"),
    ],
)
def test_options_a_client_relies_on_are_refused(
    api_server: RunningServer, path: str, extra: dict, param: str
) -> None:
    body = _chat(**extra) if path == "/chat/completions" else {"model": "fake-a", "input": "x", **extra}
    r = httpx.post(api_server.v1 + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "unsupported_parameter"


def test_harmless_options_are_accepted(api_server: RunningServer) -> None:
    body = _chat(
        response_format={"type": "text"},
        logprobs=False,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto",
        parallel_tool_calls=False,
        user="u",
    )
    assert httpx.post(api_server.v1 + "/chat/completions", json=body, timeout=30).status_code == 200


def _failing_loader(model_id: str) -> FakeOcrModel:
    raise ModelLoadError("no weights")


@pytest.mark.parametrize("loads", [True, False])
def test_readiness(loads: bool) -> None:
    mgr = ModelManager(["a"], (lambda mid: FakeOcrModel(name=mid)) if loads else _failing_loader)
    with TestClient(create_app(mgr)) as client:
        assert client.get("/ready").status_code == 503  # nothing loaded yet
        if loads:
            mgr.load_sync("a")
        else:
            with pytest.raises(ModelUnavailable):
                mgr.load_sync("a")
        r = client.get("/ready")
        assert r.status_code == (200 if loads else 503) and r.json()["ready"] is loads, r.json()
        assert client.get("/health").status_code == 200  # liveness: 200 whatever the model's state
    run(mgr.shutdown())


def test_openapi_documents_errors_and_min_items(api_server: RunningServer) -> None:
    spec = httpx.get(api_server.base_url + "/openapi.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/responses"):
        op = spec["paths"][path]["post"]
        assert {"400", "401", "404", "413", "429", "503"} <= set(op["responses"]), op["responses"].keys()
        err = op["responses"]["400"]["content"]["application/json"]["schema"]
        assert err["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert chat["properties"]["messages"]["minItems"] == 1
    assert "/ready" in spec["paths"]


def test_prompt_text_is_capped_before_tokenizing(api_server: RunningServer) -> None:
    limit = api_server.settings.server.max_prompt_chars
    parts = [{"type": "text", "text": "x" * (limit + 1)}, PARTS[1]]
    body = {"model": "fake-a", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    r = httpx.post(api_server.v1 + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text
    assert str(limit) in r.json()["error"]["message"]
    # the system text and a partial answer count too
    body["messages"] = [{"role": "system", "content": "s" * limit}, {"role": "user", "content": PARTS}]
    assert httpx.post(api_server.v1 + "/chat/completions", json=body, timeout=30).status_code == 400
    body["messages"] = [{"role": "user", "content": PARTS}, {"role": "assistant", "content": "a" * limit}]
    assert httpx.post(api_server.v1 + "/chat/completions", json=body, timeout=30).status_code == 400
    # under the cap the model decides (the fake's context is 4096 tokens: a 400 of another kind)
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "x" * (limit - 10)}, PARTS[1]]}]
    r = httpx.post(api_server.v1 + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] != "prompt_too_long", r.text
