"""Bad input, limits, auth, CORS and metrics, over raw HTTP against real servers.

Every bad request must get the right 4xx with an OpenAI error body, and the server must keep serving:
each case is followed by a good request.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from fixtures.server import (
    API_KEY,
    FAKE_OPTIONS,
    RunningServer,
    data_url,
    fake_settings,
    free_port,
    png_bytes,
    serve,
)

from deepseek_ocr_server.api.app import create_app
from deepseek_ocr_server.engine.manager import ModelManager, ModelUnavailable, Overloaded, QueueTimeout
from deepseek_ocr_server.engine.types import Event, Failed, OcrRequest, TextDelta

PNG_URL = data_url(png_bytes())


def _img_msgs(url: str = PNG_URL, text: str = "read", n: int = 1) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}}] * n
    return [{"role": "user", "content": parts}]


def _good(http: httpx.Client, base: str, headers: dict[str, str] | None = None) -> None:
    r = http.post(base + "/chat/completions", json={"model": "fake-a", "messages": _img_msgs(), "max_tokens": 2},
                  headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def _check_error(r: httpx.Response, status: int, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == type_ and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


@pytest.fixture(scope="module")
def http(api_server: RunningServer) -> httpx.Client:
    with httpx.Client(timeout=60) as c:
        yield c


def _chat(**kw: object) -> dict:
    return {"model": "fake-a", "messages": _img_msgs(), **kw}


BAD_CHAT_BODIES: list[tuple[str, object, int, str | None, str | None]] = [
    # (case, body, status, code, param)
    ("missing model", {"messages": _img_msgs()}, 400, "missing_required_parameter", "model"),
    ("unknown model", _chat(model="nope"), 404, "model_not_found", "model"),
    ("missing messages", {"model": "fake-a"}, 400, "missing_required_parameter", "messages"),
    ("messages not a list", _chat(messages="hi"), 400, None, "messages"),
    ("empty messages", _chat(messages=[]), 400, None, "messages"),
    ("no user message", _chat(messages=[{"role": "system", "content": "x"}]), 400, None, "messages"),
    ("empty content", _chat(messages=[{"role": "user", "content": ""}]), 400, None, "messages[0].content"),
    ("null content", _chat(messages=[{"role": "user", "content": None}]), 400, None, "messages[0].content"),
    ("empty parts", _chat(messages=[{"role": "user", "content": []}]), 400, None, "messages[0].content"),
    ("content wrong type", _chat(messages=[{"role": "user", "content": 5}]), 400, None, None),
    ("unsupported part", _chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400, None,
     "messages[0].content[0].type"),
    ("image part without url", _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "invalid_image_url", None),
    ("invalid base64", _chat(messages=_img_msgs("data:image/png;base64,%%%notbase64")), 400, "invalid_base64",
     "messages[0].content[1].image_url.url"),
    ("not an image", _chat(messages=_img_msgs("data:image/png;base64," + base64.b64encode(b"hello").decode())),
     400, "invalid_image", None),
    ("file scheme", _chat(messages=_img_msgs("file:///etc/passwd")), 400, "invalid_image_url", None),
    ("ftp scheme", _chat(messages=_img_msgs("ftp://example.com/a.png")), 400, "invalid_image_url", None),
    ("no scheme", _chat(messages=_img_msgs("/etc/passwd")), 400, "invalid_image_url", None),
    ("negative max_tokens", _chat(max_tokens=-1), 400, "invalid_value", "max_tokens"),
    ("zero max_completion_tokens", _chat(max_completion_tokens=0), 400, "invalid_value", "max_completion_tokens"),
    ("absurd max_tokens", _chat(max_tokens=10**12), 400, "invalid_value", "max_tokens"),
    ("top_p 2", _chat(top_p=2), 400, "invalid_value", "top_p"),
    ("top_p 0", _chat(top_p=0), 400, "invalid_value", "top_p"),
    ("temperature -1", _chat(temperature=-1), 400, "invalid_value", "temperature"),
    ("temperature 100", _chat(temperature=100), 400, "invalid_value", "temperature"),
    ("top_k 0", _chat(top_k=0), 400, "invalid_value", "top_k"),
    ("repetition_penalty 0", _chat(repetition_penalty=0), 400, "invalid_value", "repetition_penalty"),
    ("no_repeat_ngram_size -1", _chat(no_repeat_ngram_size=-1), 400, "invalid_value", "no_repeat_ngram_size"),
    ("base_size 0", _chat(base_size=0), 400, "invalid_value", "base_size"),
    ("crop_mode not bool", _chat(crop_mode="maybe"), 400, "invalid_value", "crop_mode"),
    ("seed out of range", _chat(seed=2**70), 400, "invalid_value", "seed"),
    ("n 2", _chat(n=2), 400, "invalid_value", "n"),
    ("too many stops", _chat(stop=[str(i) for i in range(20)]), 400, "invalid_value", "stop"),
    ("stream not bool", _chat(stream="yes please"), 400, "invalid_value", "stream"),
    ("markers vs images", _chat(messages=_img_msgs(text="<image><image> two?")), 400, None, None),
]


@pytest.mark.parametrize(("case", "body", "status", "code", "param"), BAD_CHAT_BODIES,
                         ids=[c[0] for c in BAD_CHAT_BODIES])
def test_bad_chat_request(
    api_server: RunningServer, http: httpx.Client, case: str, body: object, status: int, code: str | None,
    param: str | None,
) -> None:
    r = http.post(api_server.v1 + "/chat/completions", json=body)
    err = _check_error(r, status, code=code)
    if param is not None:
        assert err["param"] == param, err
    if case == "unknown model":
        assert all(mid in err["message"] for mid in FAKE_OPTIONS)
    _good(http, api_server.v1)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[]", b"null", b'"just a string"', b"\xff\xfe garbage", b'{"model": "fake-a", "messages": ['],
)
def test_malformed_json(api_server: RunningServer, http: httpx.Client, raw: bytes) -> None:
    for path in ("/chat/completions", "/responses"):
        r = http.post(api_server.v1 + path, content=raw, headers={"content-type": "application/json"})
        _check_error(r, 400)
    _good(http, api_server.v1)


def test_bad_image_urls(api_server: RunningServer, http: httpx.Client, image_server) -> None:  # noqa: ANN001
    closed = f"http://127.0.0.1:{free_port()}/x.png"
    cases = [
        (closed, "image_fetch_failed"),
        (image_server.url("/missing.png"), "image_fetch_failed"),
        (image_server.url("/text"), "invalid_image"),
        (image_server.url("/big"), "image_too_large"),
        (image_server.url("/loop"), "image_fetch_failed"),
        ("http://no-such-host.invalid/a.png", "image_fetch_failed"),
    ]
    for url, code in cases:
        r = http.post(api_server.v1 + "/chat/completions", json=_chat(messages=_img_msgs(url)))
        err = _check_error(r, 400, code=code)
        assert err["param"] == "messages[0].content[1].image_url.url"
    _good(http, api_server.v1)


def test_bad_responses_requests(api_server: RunningServer, http: httpx.Client) -> None:
    cases = [
        ({"model": "fake-a"}, 400, "input"),
        ({"model": "fake-a", "input": ""}, 400, "input"),
        ({"model": "fake-a", "input": []}, 400, "input"),
        ({"model": "fake-a", "input": [{"role": "system", "content": "x"}]}, 400, "input"),
        ({"model": "fake-a", "input": "x", "max_output_tokens": -3}, 400, "max_output_tokens"),
        ({"model": "fake-a", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400, None),
        ({"model": "unknown", "input": "x"}, 404, "model"),
    ]
    for body, status, param in cases:
        err = _check_error(http.post(api_server.v1 + "/responses", json=body), status)
        if param is not None:
            assert err["param"] == param, (body, err)
    _good(http, api_server.v1)


def test_model_that_fails_to_load(api_server: RunningServer, http: httpx.Client) -> None:
    for stream in (False, True):
        r = http.post(api_server.v1 + "/chat/completions", json=_chat(model="fake-broken", stream=stream))
        err = _check_error(r, 503, type_="server_error", code="model_unavailable")
        assert "fake-broken" in err["message"] and "fail" in err["message"]
    health = http.get(api_server.base_url + "/health").json()
    assert "fake-broken" in str(health)
    _good(http, api_server.v1)


def test_unknown_route_and_method(api_server: RunningServer, http: httpx.Client) -> None:
    _check_error(http.get(api_server.v1 + "/nope"), 404)
    _check_error(http.get(api_server.v1 + "/chat/completions"), 405)
    _good(http, api_server.v1)


def test_health(api_server: RunningServer, http: httpx.Client) -> None:
    r = http.get(api_server.base_url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and "state" in r.json()


def test_metrics_count_responses(api_server: RunningServer, http: httpx.Client) -> None:
    def count(status: str) -> float:
        text = http.get(api_server.base_url + "/metrics").text
        for line in text.splitlines():
            if line.startswith("ocr_requests_total{") and 'endpoint="/v1/chat/completions"' in line \
                    and f'status="{status}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    ok0, bad0 = count("200"), count("400")
    _good(http, api_server.v1)
    http.post(api_server.v1 + "/chat/completions", json=_chat(top_p=5))
    assert count("200") == ok0 + 1 and count("400") == bad0 + 1
    assert "text/plain" in http.get(api_server.base_url + "/metrics").headers["content-type"]


# --- strict server: private URLs refused, API key, body cap, image count, CORS ----------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def strict_http(strict_server: RunningServer) -> httpx.Client:
    with httpx.Client(timeout=60) as c:
        yield c


def test_default_refuses_private_urls(strict_server: RunningServer, strict_http: httpx.Client,
                                      image_server) -> None:  # noqa: ANN001
    port = image_server.base_url.rsplit(":", 1)[1]
    for url in (image_server.url("/page.png"), f"http://localhost:{port}/page.png", f"http://[::1]:{port}/x.png",
                "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/a.png", "http://0.0.0.0/a.png"):
        r = strict_http.post(strict_server.v1 + "/chat/completions", json=_chat(messages=_img_msgs(url)),
                             headers=AUTH)
        _check_error(r, 400, code="image_url_forbidden")
    _good(strict_http, strict_server.v1, AUTH)


def test_api_key(strict_server: RunningServer, strict_http: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        _check_error(strict_http.get(strict_server.v1 + "/models", headers=headers), 401, code="invalid_api_key")
        r = strict_http.post(strict_server.v1 + "/chat/completions", json=_chat(), headers=headers)
        _check_error(r, 401)
    assert strict_http.get(strict_server.v1 + "/models", headers=AUTH).status_code == 200
    assert strict_http.get(strict_server.base_url + "/health").status_code == 200  # /health stays open
    client = openai.OpenAI(base_url=strict_server.v1, api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == list(FAKE_OPTIONS)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict_server.v1, api_key="bad", max_retries=0).models.list()


def test_oversize_body_413(strict_server: RunningServer, strict_http: httpx.Client) -> None:
    big = data_url(b"\x89PNG" + b"\0" * (400 * 1024))
    r = strict_http.post(strict_server.v1 + "/chat/completions", json=_chat(messages=_img_msgs(big)), headers=AUTH)
    _check_error(r, 413)

    # chunked upload without Content-Length is capped too
    def gen():  # noqa: ANN202
        payload = json.dumps(_chat(messages=_img_msgs(big))).encode()
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    r = strict_http.post(strict_server.v1 + "/chat/completions", content=gen(),
                         headers={**AUTH, "content-type": "application/json"})
    _check_error(r, 413)
    _good(strict_http, strict_server.v1, AUTH)


def test_too_many_images(strict_server: RunningServer, strict_http: httpx.Client) -> None:
    r = strict_http.post(strict_server.v1 + "/chat/completions", json=_chat(messages=_img_msgs(n=3)), headers=AUTH)
    err = _check_error(r, 400, code="too_many_images")
    assert "2" in err["message"]
    _good(strict_http, strict_server.v1, AUTH)


def test_cors_preflight(strict_server: RunningServer, strict_http: httpx.Client) -> None:
    pre = {
        "Origin": "http://ui.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = strict_http.options(strict_server.v1 + "/chat/completions", headers=pre)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = strict_http.options(strict_server.v1 + "/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = strict_http.get(strict_server.v1 + "/models", headers={**AUTH, "Origin": "http://ui.example"})
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    # errors carry CORS headers too, so browsers can read them
    r = strict_http.get(strict_server.v1 + "/models", headers={"Origin": "http://ui.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://ui.example"


# --- a full queue through the real engine -> 429 ---------------------------------------------------


@pytest.fixture(scope="module")
def busy_server(fake_checkpoints, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("busy-server")
    yield from serve(fake_settings(root, fake_checkpoints, max_running=1, max_queued=1))


def test_full_queue_is_429_with_retry_after(busy_server: RunningServer) -> None:
    slow = {"model": "fake-slow", "messages": _img_msgs(), "max_tokens": 6000, "stream": True}
    queued_result: list[int] = []
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", busy_server.v1 + "/chat/completions", json=slow) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # kept referenced: dropping it would close the connection
            for line in lines:  # the slow request holds the only running slot
                if '"content":"' in line and '"content":""' not in line:
                    break

            def queued() -> None:
                with httpx.Client(timeout=120) as h:
                    r = h.post(busy_server.v1 + "/chat/completions",
                               json={"model": "fake-slow", "messages": _img_msgs(), "max_tokens": 2})
                    queued_result.append(r.status_code)

            t = threading.Thread(target=queued)
            t.start()
            deadline = time.monotonic() + 30
            while http.get(busy_server.base_url + "/health").json()["queued"] < 1:
                assert time.monotonic() < deadline, "the second request never got queued"
                time.sleep(0.02)
            r = http.post(busy_server.v1 + "/chat/completions", json=_chat(model="fake-slow"))
            _check_error(r, 429, type_="rate_limit_error", code="server_overloaded")
            assert int(r.headers["retry-after"]) >= 1
            r = http.post(busy_server.v1 + "/responses", json={"model": "fake-slow", "input": [_img_msgs()[0]],
                                                               "stream": True})
            _check_error(r, 429, type_="rate_limit_error")
            assert queued_result == []  # still waiting behind the slow stream
        # the slow stream is gone: the queued request gets the slot
        t.join(timeout=120)
        assert queued_result == [200]


def test_client_leaving_the_queue_cancels_its_request(busy_server: RunningServer) -> None:
    slow = {"model": "fake-slow", "messages": _img_msgs(), "max_tokens": 6000, "stream": True}

    def health() -> dict:
        return httpx.get(busy_server.base_url + "/health", timeout=30).json()

    with httpx.Client(timeout=120) as http:
        with http.stream("POST", busy_server.v1 + "/chat/completions", json=slow) as resp:
            lines = resp.iter_lines()  # kept referenced: dropping it would close the connection
            for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    break
            for stream in (True, False):
                # a request that waits for the slot; its client gives up before the first token
                with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(30, read=0.5)) as h:
                    h.post(busy_server.v1 + "/chat/completions", json={**slow, "stream": stream, "max_tokens": 2})
                deadline = time.monotonic() + 30
                while (state := health())["queued"] > 0:
                    assert time.monotonic() < deadline, "the abandoned request stayed queued"
                    time.sleep(0.02)
                assert state["running"] == 1  # the slow stream still runs: the waiter left on its own


# --- engine errors -> HTTP (a manager whose submit fails in scripted ways) --------------------------


class ScriptedManager(ModelManager):
    def __init__(self) -> None:
        super().__init__(["m"], lambda _id: None)  # type: ignore[arg-type, return-value]
        self.mode = "ok"
        self.closed = 0

    def submit(self, req: OcrRequest) -> AsyncIterator[Event]:
        if self.mode == "overloaded":
            raise Overloaded("too busy", retry_after=3)
        return self._events(req)

    async def _events(self, req: OcrRequest) -> AsyncIterator[Event]:
        try:
            if self.mode == "unavailable":
                raise ModelUnavailable("model 'm' failed to load: no weights")
            if self.mode == "queue_timeout":
                raise QueueTimeout("waited too long")
            if self.mode == "failed_first":
                yield Failed("prompt too long", status=400, type="invalid_request_error")
                return
            yield TextDelta("ab")
            if self.mode == "failed_mid":
                yield Failed("decode exploded")
                return
            raise RuntimeError("boom")  # an unexpected engine bug mid-stream
        finally:
            self.closed += 1


@pytest.fixture()
def scripted() -> tuple[ScriptedManager, TestClient]:
    m = ScriptedManager()
    return m, TestClient(create_app(m), raise_server_exceptions=False)


def test_engine_errors_before_first_event(scripted: tuple[ScriptedManager, TestClient]) -> None:
    m, c = scripted
    body = {"model": "m", "messages": _img_msgs()}
    for mode, status, code in [
        ("overloaded", 429, "server_overloaded"),
        ("unavailable", 503, "model_unavailable"),
        ("queue_timeout", 503, "queue_timeout"),
        ("failed_first", 400, None),
    ]:
        m.mode = mode
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={**body, "stream": stream})
            _check_error(r, status, type_="invalid_request_error" if status == 400 else None or _type(status),
                         code=code)
            if status == 429:
                assert r.headers["retry-after"] == "3"
            r = c.post("/v1/responses", json={"model": "m", "input": [body["messages"][0]], "stream": stream})
            assert r.status_code == status


def _type(status: int) -> str:
    return {429: "rate_limit_error", 503: "server_error"}[status]


def test_engine_errors_mid_stream(scripted: tuple[ScriptedManager, TestClient]) -> None:
    m, c = scripted
    body = {"model": "m", "messages": _img_msgs(), "stream": True}
    for mode in ("failed_mid", "bug_mid"):
        m.mode = mode
        closed = m.closed
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert datas[1]["choices"][0]["delta"]["content"] == "ab"
        assert set(datas[-1]) == {"error"} and datas[-1]["error"]["message"]
        assert "[DONE]" not in r.text
        r = c.post("/v1/chat/completions", json={**body, "stream": False})
        _check_error(r, 500, type_="server_error")
        r = c.post("/v1/responses", json={"model": "m", "input": [body["messages"][0]], "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
        assert m.closed == closed + 3  # every engine iterator was closed


def test_json_body_accepted_whatever_the_content_type(api_server: RunningServer, http: httpx.Client) -> None:
    raw = json.dumps({"model": "fake-a", "messages": _img_msgs(), "max_tokens": 2}).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain", None):  # curl -d sends a form type
        headers = {"content-type": ctype} if ctype else {}
        r = http.post(api_server.v1 + "/chat/completions", content=raw, headers=headers)
        assert r.status_code == 200, (ctype, r.text)
    assert "/v1/chat/completions" in http.get(api_server.base_url + "/openapi.json").json()["paths"]
