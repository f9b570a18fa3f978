"""Client input that used to produce a 5xx (each must be a 4xx), and a catch-all fuzz over the API.

Every case is followed by a good request: the server keeps serving.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest
from fixtures.server import RunningServer, data_url, png_bytes

PNG_URL = data_url(png_bytes())


def _msgs(text: str = "read", url: str = PNG_URL) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    with httpx.Client(timeout=60) as c:
        yield c


def _good(http: httpx.Client, base: str, model: str = "fake-a") -> None:
    r = http.post(base + "/chat/completions", json={"model": model, "messages": _msgs(), "max_tokens": 2})
    assert r.status_code == 200, r.text


def _is_4xx_error(r: httpx.Response) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def test_image_marker_in_system_message_is_400(real_server: RunningServer, http: httpx.Client) -> None:
    body = {
        "model": "deepseek-ocr",
        "max_tokens": 2,
        "messages": [{"role": "system", "content": "look at <image> please"}, *_msgs()],
    }
    _is_4xx_error(http.post(real_server.v1 + "/chat/completions", json=body))
    _good(http, real_server.v1, "deepseek-ocr")
    # PaddleOCR-VL's image marker is another token: "<image>" is plain text to it
    r = http.post(real_server.v1 + "/chat/completions", json={**body, "model": "paddleocr-vl"})
    assert r.status_code == 200, r.text


LONE_SURROGATE = '"\\ud800"'  # a JSON escape that decodes to a str no UTF-8 codec accepts


@pytest.mark.parametrize(
    "where",
    ["user text", "user string", "system", "stop", "model", "responses input", "instructions", "image url"],
)
def test_lone_surrogate_is_400(api_server: RunningServer, http: httpx.Client, where: str) -> None:
    chat = {"model": "fake-a", "messages": _msgs("@@"), "max_tokens": 2}
    path = "/chat/completions"
    if where == "user string":
        chat["messages"] = [{"role": "user", "content": "@@"}]
    elif where == "system":
        chat["messages"] = [{"role": "system", "content": "@@"}, *_msgs()]
    elif where == "stop":
        chat["stop"] = "@@"
    elif where == "model":
        chat["model"] = "@@"
    elif where == "image url":
        chat["messages"] = _msgs(url="https://example.com/@@.png")
    elif where in ("responses input", "instructions"):
        path = "/responses"
        chat = {
            "model": "fake-a",
            "input": "@@" if where == "responses input" else "x",
            "max_output_tokens": 2,
        }
        if where == "instructions":
            chat["instructions"] = "@@"
    raw = json.dumps(chat).replace('"@@"', LONE_SURROGATE).replace("@@", "\\ud800")
    err = _is_4xx_error(
        http.post(api_server.v1 + path, content=raw, headers={"content-type": "application/json"})
    )
    assert err["code"] in ("invalid_value", "invalid_json"), err
    _good(http, api_server.v1)


@pytest.mark.parametrize("depth", [100, 900, 1200, 100_000])
def test_deeply_nested_json_is_400(api_server: RunningServer, http: httpx.Client, depth: int) -> None:
    for path in ("/chat/completions", "/responses"):
        raw = '{"model": "fake-a", "messages": ' + "[" * depth + "]" * depth + "}"
        _is_4xx_error(
            http.post(api_server.v1 + path, content=raw, headers={"content-type": "application/json"})
        )
        raw = '{"model": "fake-a", "metadata": ' + '{"a":' * depth + "1" + "}" * depth + ', "input": "x"}'
        _is_4xx_error(
            http.post(api_server.v1 + path, content=raw, headers={"content-type": "application/json"})
        )
    _good(http, api_server.v1)


def test_image_url_port_out_of_range_is_400(
    api_server: RunningServer, http: httpx.Client, image_server
) -> None:  # noqa: ANN001
    for url in (
        "http://example.com:99999/a.png",
        "http://127.0.0.1:65536/a.png",
        "http://[::1:99999/a.png",
        image_server.url("/redirect-bad-port"),
    ):
        body = {"model": "fake-a", "messages": _msgs(url=url), "max_tokens": 2}
        err = _is_4xx_error(http.post(api_server.v1 + "/chat/completions", json=body))
        assert err["param"] == "messages[0].content[1].image_url.url", err
    _good(http, api_server.v1)


# --- catch-all: no request body produces a 5xx ---------------------------------------------------------

_ATOMS: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**64,
    1e308,
    -0.5,
    "",
    "x",
    "\u0000",
    "\ud800",
    "<image>",
    "data:image/png;base64,",
    PNG_URL,
    "http://[::1]:0/",
    "fake-a",
    [],
    {},
    [None],
    {"type": "text"},
]
_KEYS = [
    "model",
    "messages",
    "input",
    "instructions",
    "role",
    "content",
    "type",
    "text",
    "image_url",
    "url",
    "input_image",
    "max_tokens",
    "max_output_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "include_usage",
    "stop",
    "n",
    "seed",
    "top_k",
    "base_size",
    "image_size",
    "crop_mode",
    "do_sample",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "metadata",
    "detail",
    "file_id",
    "image_url",
]


def _random_value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth > 4 or r < 0.45:
        return json.loads(json.dumps(rng.choice(_ATOMS)))  # a fresh copy: atoms may be lists/dicts
    if r < 0.7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(_KEYS): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _slots(node: object) -> list[tuple[dict | list, object]]:
    """Every (container, key/index) of a JSON tree."""
    out: list[tuple[dict | list, object]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((node, k))
            out += _slots(v)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((node, i))
            out += _slots(v)
    return out


def _mutated_body(rng: random.Random) -> dict:
    base: dict = rng.choice(
        [
            {
                "model": "fake-a",
                "messages": [{"role": "system", "content": "s"}, *_msgs()],
                "max_tokens": 2,
                "stop": ["q"],
            },
            {
                "model": "fake-a",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "x"},
                            {"type": "input_image", "image_url": PNG_URL},
                        ],
                    }
                ],
                "instructions": "i",
                "max_output_tokens": 2,
            },
        ]
    )
    body = json.loads(json.dumps(base))
    for _ in range(rng.randint(1, 3)):
        container, key = rng.choice(_slots(body))
        if rng.random() < 0.7:  # replace a value
            container[key] = _random_value(rng)  # type: ignore[index]
        elif isinstance(container, dict):  # add a key
            container[rng.choice(_KEYS)] = _random_value(rng)
        else:
            container.append(_random_value(rng))
    return body


def test_no_request_body_gives_a_5xx(api_server: RunningServer, http: httpx.Client) -> None:
    rng = random.Random(17)
    statuses: dict[int, int] = {}
    for i in range(300):
        body = _mutated_body(rng)
        path = "/chat/completions" if "messages" in body else "/responses"
        raw = json.dumps(body, ensure_ascii=True, allow_nan=True)
        r = http.post(api_server.v1 + path, content=raw, headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, raw[:2000], r.text)
        if r.status_code >= 400:
            _is_4xx_error(r)
    assert statuses.get(200, 0) > 10 and sum(v for k, v in statuses.items() if k >= 400) > 10, statuses
    _good(http, api_server.v1)


# --- orphaned image downloads ---------------------------------------------------------------------


def _wait_for(pred, seconds: float = 5.0) -> bool:  # noqa: ANN001
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _slow_parts(image_server, n: int) -> list[dict]:  # noqa: ANN001
    return [{"type": "image_url", "image_url": {"url": image_server.url(f"/slow?{i}")}} for i in range(n)]


def test_failed_image_cancels_the_other_downloads(
    api_server: RunningServer, http: httpx.Client, image_server
) -> None:  # noqa: ANN001
    before = dict(image_server.slow)
    parts = [
        *_slow_parts(image_server, 3),
        {"type": "image_url", "image_url": {"url": image_server.url("/nope")}},
    ]
    body = {"model": "fake-a", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    r = http.post(api_server.v1 + "/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_fetch_failed", r.text

    def delta(key: str) -> int:
        return image_server.slow[key] - before[key]

    # every slow download that started is cut, none is left running in the background
    assert _wait_for(lambda: delta("started") == delta("aborted")), image_server.slow
    assert delta("completed") == 0
    _good(http, api_server.v1)


def test_client_disconnect_cancels_image_downloads(api_server: RunningServer, image_server) -> None:  # noqa: ANN001
    before = dict(image_server.slow)
    body = {
        "model": "fake-a",
        "messages": [{"role": "user", "content": _slow_parts(image_server, 3)}],
        "max_tokens": 2,
    }
    with pytest.raises(httpx.TimeoutException), httpx.Client(timeout=httpx.Timeout(10, read=0.5)) as c:
        c.post(api_server.v1 + "/chat/completions", json=body)  # the client gives up and closes
    assert _wait_for(lambda: image_server.slow["aborted"] - before["aborted"] == 3), image_server.slow
    assert image_server.slow["completed"] == before["completed"]
