"""The API through the official ``openai`` client against a real uvicorn server with fake models."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fixtures.server import (
    FAKE_OPTIONS,
    RunningServer,
    data_url,
    expected_answer,
    png_bytes,
)
from PIL import Image

PNG = png_bytes()
IMG = Image.open(io.BytesIO(PNG)).convert("RGB")


@pytest.fixture(scope="module")
def client(api_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.v1, api_key="anything", max_retries=0, timeout=60)


def _chat_image(text: str | None = "read this", url: str | None = None) -> list[dict]:
    parts: list[dict] = []
    if text is not None:
        parts.append({"type": "text", "text": text})
    parts.append({"type": "image_url", "image_url": {"url": url or data_url(PNG)}})
    return [{"role": "user", "content": parts}]


def test_models_listed_without_loading(api_server: RunningServer, client: openai.OpenAI) -> None:
    before = list(api_server.loads)
    models = client.models.list()
    assert [m.id for m in models.data] == list(FAKE_OPTIONS)
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models.data)
    assert api_server.loads == before


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="fake-a", messages=_chat_image("read this"))
    assert out.object == "chat.completion" and out.model == "fake-a"
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_answer("fake-a", "read this", [IMG])
    assert choice.finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == len(choice.message.content) + 1  # + EOS
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream_equals_non_stream_and_usage(client: openai.OpenAI) -> None:
    msgs = _chat_image("stream me")
    full = client.chat.completions.create(model="fake-b", messages=msgs)
    chunks = list(
        client.chat.completions.create(
            model="fake-b", messages=msgs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    # without include_usage: no usage chunk
    plain = list(client.chat.completions.create(model="fake-b", messages=msgs, stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_chat_finish_reason_length(client: openai.OpenAI) -> None:
    msgs = _chat_image("long one")
    out = client.chat.completions.create(model="fake-a", messages=msgs, max_tokens=2)
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content == expected_answer("fake-a", "long one", [IMG], 2)
    assert out.usage.completion_tokens == 2
    out = client.chat.completions.create(model="fake-a", messages=msgs, max_completion_tokens=1)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 1
    chunks = list(client.chat.completions.create(model="fake-a", messages=msgs, max_tokens=2, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_image_without_text_uses_default_prompt(api_server: RunningServer, client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="fake-a", messages=_chat_image(None))
    prompt = api_server.settings.default_prompt("fake-a")
    assert out.choices[0].message.content == expected_answer("fake-a", prompt, [IMG])


def test_chat_image_from_http_url(client: openai.OpenAI, image_server) -> None:  # noqa: ANN001
    for path in ("/page.png", "/redirect"):
        out = client.chat.completions.create(model="fake-a", messages=_chat_image("web", image_server.url(path)))
        img = Image.open(io.BytesIO(image_server.files["/page.png"])).convert("RGB")
        assert out.choices[0].message.content == expected_answer("fake-a", "web", [img])


def test_text_only_request_answered_without_model(api_server: RunningServer, client: openai.OpenAI) -> None:
    before = list(api_server.loads)
    msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": "Generate a title for this chat"}]
    out = client.chat.completions.create(model="fake-b", messages=msgs)
    assert out.choices[0].finish_reason == "stop" and "image" in out.choices[0].message.content
    chunks = list(client.chat.completions.create(model="fake-b", messages=msgs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    r = client.responses.create(model="fake-b", input="hello?")
    assert r.status == "completed" and "image" in r.output_text
    assert api_server.loads == before  # no model was loaded for any of them


def test_sampling_fields_accepted(client: openai.OpenAI) -> None:
    msgs = _chat_image("sample")
    kw = dict(model="fake-a", messages=msgs, temperature=0.8, top_p=0.9, seed=7, max_tokens=8)
    a = client.chat.completions.create(**kw, extra_body={"top_k": 5, "repetition_penalty": 1.1})
    b = client.chat.completions.create(**kw, extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same text
    out = client.chat.completions.create(
        model="fake-a", messages=msgs, stop=["zzzz", "q"],
        extra_body={"do_sample": False, "no_repeat_ngram_size": 3, "base_size": 640, "image_size": 640,
                    "crop_mode": False},
    )
    assert "q" not in out.choices[0].message.content


def test_stop_string_cuts_answer(client: openai.OpenAI) -> None:
    msgs = _chat_image("stop test")
    full = client.chat.completions.create(model="fake-b", messages=msgs).choices[0].message.content
    assert len(full) >= 3
    stop = full[1:3]
    out = client.chat.completions.create(model="fake-b", messages=msgs, stop=stop)
    assert out.choices[0].message.content == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


# --- responses ---------------------------------------------------------------------------------------


def _resp_input(text: str | None = "respond", url: str | None = None) -> list[dict]:
    parts: list[dict] = []
    if text is not None:
        parts.append({"type": "input_text", "text": text})
    parts.append({"type": "input_image", "image_url": url or data_url(PNG)})
    return [{"role": "user", "content": parts}]


def test_responses_non_streaming(client: openai.OpenAI) -> None:
    r = client.responses.create(model="fake-b", input=_resp_input(), instructions="be exact")
    assert r.object == "response" and r.status == "completed" and r.model == "fake-b"
    # instructions become the system text
    assert r.output_text == expected_answer("fake-b", "respond", [IMG], system="be exact")
    assert r.instructions == "be exact"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens == len(r.output_text) + 1
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    r2 = client.responses.create(model="fake-b", input=_resp_input())
    assert r2.output_text == expected_answer("fake-b", "respond", [IMG])
    assert r2.output_text != r.output_text


def test_responses_incomplete_on_budget(client: openai.OpenAI) -> None:
    r = client.responses.create(model="fake-a", input=_resp_input(), max_output_tokens=2)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2


def test_responses_stream_helper_and_equality(client: openai.OpenAI) -> None:
    full = client.responses.create(model="fake-a", input=_resp_input("same"))
    deltas: list[str] = []
    types: list[str] = []
    with client.responses.stream(model="fake-a", input=_resp_input("same")) as stream:
        for ev in stream:
            types.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == full.output_text == final.output_text
    assert final.status == "completed" and final.usage.output_tokens == full.usage.output_tokens
    assert types[:4] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"
    ]
    assert types[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]


def test_responses_raw_stream_sequence_numbers(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="fake-a", input=_resp_input(), stream=True, max_output_tokens=3))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    r = client.responses.create(model="fake-a", input="just text, no image", stream=True)
    assert [e.type for e in r][-1] == "response.completed"


def test_responses_image_url_and_string_input(client: openai.OpenAI, image_server) -> None:  # noqa: ANN001
    r = client.responses.create(model="fake-b", input=_resp_input(None, image_server.url("/other.png")))
    img = Image.open(io.BytesIO(image_server.files["/other.png"])).convert("RGB")
    assert r.output_text == expected_answer("fake-b", "read it (b)", [img])


# --- model switching and disconnects ---------------------------------------------------------------


def test_model_switching_concurrent(api_server: RunningServer, client: openai.OpenAI) -> None:
    jobs = [("fake-a" if i % 2 == 0 else "fake-b", f"job {i}", i % 3 == 0) for i in range(8)]

    def run(job: tuple[str, str, bool]) -> tuple[str, str]:
        model, text, stream = job
        if stream:
            chunks = client.chat.completions.create(model=model, messages=_chat_image(text), stream=True)
            return model, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = client.chat.completions.create(model=model, messages=_chat_image(text))
        assert r.model == model
        return model, r.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs))
    for (model, text, _), (got_model, answer) in zip(jobs, results, strict=True):
        assert got_model == model
        assert answer == expected_answer(model, text, [IMG]), (model, text)
    # the two models really answer differently
    assert expected_answer("fake-a", "job 0", [IMG]) != expected_answer("fake-b", "job 0", [IMG])


def test_disconnect_mid_stream_frees_the_slot(api_server: RunningServer) -> None:
    body = {
        "model": "fake-slow",
        "messages": _chat_image("slow"),
        "max_tokens": 6000,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", api_server.v1 + "/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    got += 1
                    if got >= 3:
                        break
            # leaving the block closes the connection mid-stream
        model = api_server.manager.model
        assert model is not None
        # the engine sees the disconnect and releases the sequence's cache
        deadline = time.monotonic() + 30
        while model.live_caches and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        assert model.live_caches == 0  # type: ignore[attr-defined]
        decoded = model.decode_calls  # type: ignore[attr-defined]
        # the only running slot is free again: a following request is served
        r = http.post(
            api_server.v1 + "/chat/completions",
            json={"model": "fake-slow", "messages": _chat_image("after"), "max_tokens": 3},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        assert decoded < 1000  # the abandoned 6000-token answer was not generated to its end


def test_non_streaming_disconnect_cancels(api_server: RunningServer) -> None:
    body = {"model": "fake-slow", "messages": _chat_image("slow 2"), "max_tokens": 6000}
    started = threading.Event()

    def fire() -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as http:
                started.set()
                http.post(api_server.v1 + "/chat/completions", json=body)
        except httpx.ReadTimeout:
            pass  # the client gives up and closes the connection

    t = threading.Thread(target=fire)
    t.start()
    t.join()
    assert started.is_set()
    r = httpx.post(
        api_server.v1 + "/chat/completions",
        json={"model": "fake-slow", "messages": _chat_image("after 2"), "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200
    model = api_server.manager.model
    assert model is not None and model.live_caches == 0  # type: ignore[attr-defined]


def test_models_and_health_answer_while_a_model_loads(fake_checkpoints) -> None:  # noqa: ANN001
    from fixtures.server import ServerThread

    from deepseek_ocr_server.api.app import create_app
    from deepseek_ocr_server.engine.manager import ModelManager
    from deepseek_ocr_server.models import load_model

    release = threading.Event()
    entered = threading.Event()

    def slow_loader(model_id: str):  # noqa: ANN202
        entered.set()
        assert release.wait(60), "test never released the loader"
        return load_model("fake", fake_checkpoints[model_id])

    manager = ModelManager(list(fake_checkpoints), slow_loader)
    try:
        with ServerThread(create_app(manager)) as srv, httpx.Client(timeout=60) as http:
            base = f"http://127.0.0.1:{srv.port}"
            result: list[httpx.Response] = []
            t = threading.Thread(target=lambda: result.append(http.post(
                base + "/v1/chat/completions", json={"model": "fake-a", "messages": _chat_image("x")})))
            t.start()
            assert entered.wait(60)
            # the loader is blocked: the model list and health still answer at once
            assert [m["id"] for m in http.get(base + "/v1/models").json()["data"]] == list(fake_checkpoints)
            assert http.get(base + "/health").json()["state"] == "loading"
            release.set()
            t.join(60)
            assert result and result[0].status_code == 200
            assert result[0].json()["choices"][0]["message"]["content"] == expected_answer("fake-a", "x", [IMG])
    finally:
        release.set()
        asyncio.run(manager.shutdown())
