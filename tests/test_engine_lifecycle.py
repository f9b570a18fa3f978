"""Engine behaviour under cancellation and hostile load, on the fake model (threading gates, no timing)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_engine_scheduler import collect, manager_for, req, run

from deepseek_ocr_server.testing.fake import FakeOcrModel


def test_cancel_during_prefill_stops_it_between_layers() -> None:
    reached, go = threading.Event(), threading.Event()

    def on_layer(model: FakeOcrModel, layer: int) -> None:
        if layer == 3 and not reached.is_set():
            reached.set()
            assert go.wait(30)

    model = FakeOcrModel(name="a", prefill_layers=50, on_layer=on_layer)
    mgr = manager_for({"a": model})

    async def main() -> None:
        stream = mgr.submit(req("first"))
        first = asyncio.ensure_future(stream.__anext__())
        assert await asyncio.to_thread(reached.wait, 30)
        first.cancel()  # the client went away in the middle of the prefill
        await asyncio.gather(first, return_exceptions=True)
        go.set()
        text, fin = await collect(mgr.submit(req("second")))  # runs after the first admission ended
        assert fin.finish_reason == "stop"
        # the first prefill stopped at the layer where it was cancelled; no token, no cache left
        assert model.layers_run == 4 + 50
        assert model.prefill_calls == 1 and model.live_caches == 0

    run(main())
    run(mgr.shutdown())


def test_absent_model_never_evicts_the_resident_one() -> None:
    """A request for a model whose files cannot be resolved fails with 503 while the resident model
    keeps serving: no drain, no unload, no reload."""
    from deepseek_ocr_server.engine.manager import ModelManager, ModelUnavailable

    loads: list[str] = []
    resolving = threading.Event()
    release = threading.Event()
    models = {"a": FakeOcrModel(name="a", min_answer=40, answer_span=1), "absent": None}

    def loader(model_id: str) -> FakeOcrModel:
        loads.append(model_id)
        return models[model_id]  # type: ignore[return-value]

    def resolver(model_id: str, report: object) -> None:
        if model_id == "absent":
            resolving.set()
            assert release.wait(30)
            raise FileNotFoundError("/models/absent/model.safetensors")

    mgr = ModelManager(list(models), loader, max_running=2, resolver=resolver)

    async def main() -> None:
        await collect(mgr.submit(req("warm")))  # "a" is resident
        running = mgr.submit(req("long"))
        first = await running.__anext__()
        bad = mgr.submit(req("x", model="absent"))
        bad_first = asyncio.ensure_future(bad.__anext__())
        assert await asyncio.to_thread(resolving.wait, 30)
        assert mgr.status().resolving == ["absent"]
        # while the files resolve, a request that arrived after the absent one is served by "a"
        text, fin = await collect(mgr.submit(req("innocent")))
        assert fin.finish_reason == "stop"
        release.set()
        try:
            await bad_first
            raise AssertionError("the absent model's request must fail")
        except ModelUnavailable as exc:
            assert "/models" not in exc.message
        rest, fin = await collect(running, first.text)  # the running stream was never cut
        assert fin.finish_reason == "stop" and len(rest) == 40
        st = mgr.status()
        assert st.model_id == "a" and st.state == "ready" and "absent" in st.failed and st.resolving == []
        assert "FileNotFoundError" in st.failed["absent"]
        await collect(mgr.submit(req("after")))

    run(main())
    run(mgr.shutdown())
    assert loads == ["a"]  # never unloaded, never reloaded


def test_a_slow_prepare_does_not_stall_running_streams() -> None:
    """Tokenizing / preprocessing a new request runs beside the worker: the running stream finishes
    while the new request's prepare is still blocked (on the worker thread this would deadlock)."""
    release = threading.Event()

    def on_prepare(model: FakeOcrModel, text: str) -> None:
        if text == "huge":
            assert release.wait(30), "the running stream never finished while prepare was blocked"

    model = FakeOcrModel(name="a", min_answer=30, answer_span=1, on_prepare=on_prepare)
    mgr = manager_for({"a": model}, max_running=2, prefill_slice_s=0.0)

    async def main() -> None:
        running = mgr.submit(req("small"))
        first = await running.__anext__()
        huge = mgr.submit(req("huge"))
        text, fin = await collect(running, first.text)  # completes while "huge" is being prepared
        assert fin.finish_reason == "stop" and len(text) == 30
        release.set()
        _, fin = await collect(huge)
        assert fin.finish_reason == "stop"

    run(main())
    run(mgr.shutdown())


def test_a_failed_load_keeps_the_resident_model() -> None:
    """The files resolve but the load itself fails (corrupt weights, config mismatch): the failure is
    recorded on that entry only, and the model that served before serves again (reloaded)."""
    from deepseek_ocr_server.engine.manager import ModelManager, ModelUnavailable
    from deepseek_ocr_server.models.base import ModelLoadError

    loads: list[str] = []
    a = FakeOcrModel(name="a")

    def loader(model_id: str) -> FakeOcrModel:
        loads.append(model_id)
        if model_id == "bad":
            raise ModelLoadError("model.safetensors: header is not valid JSON")
        return a

    mgr = ModelManager(["a", "bad"], loader, resolver=lambda model_id, report: None)

    async def main() -> None:
        await collect(mgr.submit(req("warm")))
        bad = mgr.submit(req("x", model="bad"))
        after = mgr.submit(req("after"))  # arrived behind the broken entry's request
        try:
            await bad.__anext__()
            raise AssertionError("the broken model's request must fail")
        except ModelUnavailable as exc:
            assert "header" not in exc.message  # the reason is for the operator
        text, fin = await collect(after)
        assert fin.finish_reason == "stop"
        with pytest.raises(ModelUnavailable):
            mgr.submit(req("x", model="bad"))  # answered at once, nothing unloaded
        await collect(mgr.submit(req("later")))  # served once "a" is back (it is reloaded at once)
        st = mgr.status()
        assert st.model_id == "a" and st.state == "ready" and st.error is None, st
        assert "header is not valid JSON" in st.failed["bad"] and list(st.failed) == ["bad"]

    run(main())
    run(mgr.shutdown())
    assert loads == ["a", "bad", "a"]


def test_a_corrupt_checkpoint_never_leaves_the_server_without_its_model(paddle_ckpt, tmp_path) -> None:
    """The same on a real family: a copy of the tiny PaddleOCR-VL checkpoint with truncated weights."""
    import shutil

    import torch

    from deepseek_ocr_server.engine.manager import ModelManager, ModelUnavailable
    from deepseek_ocr_server.models import load_model
    from deepseek_ocr_server.models.base import ModelFiles

    corrupt = tmp_path / "corrupt"
    shutil.copytree(paddle_ckpt, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    files = {"good": ModelFiles.from_dir(paddle_ckpt), "corrupt": ModelFiles.from_dir(corrupt)}

    def loader(model_id: str):
        return load_model("paddleocr-vl", files[model_id], device="cpu", dtype=torch.float32)

    mgr = ModelManager(list(files), loader, resolver=lambda model_id, report: files[model_id])

    async def main() -> None:
        _, first = await collect(mgr.submit(req("OCR:", model="good", max_new_tokens=3)))
        with pytest.raises(ModelUnavailable):
            await mgr.submit(req("OCR:", model="corrupt", max_new_tokens=3)).__anext__()
        _, again = await collect(mgr.submit(req("OCR:", model="good", max_new_tokens=3)))
        assert again.completion_tokens == first.completion_tokens
        st = mgr.status()
        assert st.model_id == "good" and st.state == "ready" and list(st.failed) == ["corrupt"], st

    run(main())
    run(mgr.shutdown())


def test_a_failed_load_over_http_keeps_serving(api_server) -> None:
    """``fake-broken``'s files resolve, its load fails: /health still shows the resident model ready and
    the failure on that entry only; the resident model answers the next request."""
    import httpx
    from fixtures.server import data_url, png_bytes

    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]
    chat = {"messages": [{"role": "user", "content": content}], "max_tokens": 4}
    with httpx.Client(timeout=60) as http:
        assert (
            http.post(api_server.v1 + "/chat/completions", json={**chat, "model": "fake-a"}).status_code
            == 200
        )
        r = http.post(api_server.v1 + "/chat/completions", json={**chat, "model": "fake-broken"})
        assert r.status_code == 503
        for _ in range(600):  # the resident model is being loaded again (never "failed")
            health = http.get(api_server.base_url + "/health").json()
            assert health["state"] in ("loading", "ready") and health["model"] == "fake-a", health
            if health["state"] == "ready":
                break
            time.sleep(0.05)
        assert health["model"] == "fake-a" and health["state"] == "ready" and health["ready"], health
        assert "fake-broken" in health["failed"] and health["error"] is None
        assert (
            http.post(api_server.v1 + "/chat/completions", json={**chat, "model": "fake-a"}).status_code
            == 200
        )


def test_health_shows_download_progress() -> None:
    """While a model's files download (a fake downloader reporting bytes), ``/health`` shows bytes done /
    total per file and in all; the entry leaves ``downloads`` once its files are in."""
    from fastapi.testclient import TestClient

    from deepseek_ocr_server.api.app import create_app
    from deepseek_ocr_server.engine.manager import ModelManager

    halfway, finish = threading.Event(), threading.Event()

    def resolver(model_id: str, report) -> None:
        if model_id == "big":
            report("config.json", 120, 120)
            report("model.safetensors", 0, 1000)
            report("model.safetensors", 400, 1000)
            halfway.set()
            assert finish.wait(30)
            report("model.safetensors", 1000, 1000)

    mgr = ModelManager(["a", "big"], lambda mid: FakeOcrModel(name=mid), resolver=resolver)
    with TestClient(create_app(mgr)) as client:

        async def main() -> None:
            stream = mgr.submit(req("x", model="big"))
            first = asyncio.ensure_future(stream.__anext__())
            assert await asyncio.to_thread(halfway.wait, 30)
            body = await asyncio.to_thread(lambda: client.get("/health").json())
            assert body["state"] == "loading" and body["model"] == "big" and body["resolving"] == ["big"], (
                body
            )
            assert body["downloads"]["big"] == {
                "bytes_done": 520,
                "bytes_total": 1120,
                "files": {
                    "config.json": {"bytes_done": 120, "bytes_total": 120},
                    "model.safetensors": {"bytes_done": 400, "bytes_total": 1000},
                },
            }
            finish.set()
            await collect(stream, (await first).text)
            body = await asyncio.to_thread(lambda: client.get("/health").json())
            assert body["state"] == "ready" and body["downloads"] == {} and body["resolving"] == [], body

        run(main())
    run(mgr.shutdown())


def test_no_prepare_thread_outlives_its_admission() -> None:
    """A thread that ran torch ops keeps an OpenMP thread team alive as long as it lives, and a second
    live team slows every later decode step on a small machine. So with nothing running, prepare runs on
    the worker thread itself, and with streams running its helper thread ends with the admission."""
    seen: dict[str, str] = {}

    def on_prepare(model: FakeOcrModel, text: str) -> None:
        seen[text] = threading.current_thread().name

    # "first" decodes for ~10 s (2000 tokens, 5 ms a step) and is closed once "second" is done
    model = FakeOcrModel(name="a", min_answer=2000, answer_span=1, max_context=8192, step_delay=0.005,
                         on_prepare=on_prepare)
    mgr = manager_for({"a": model}, max_running=2, prefill_slice_s=0.0)

    async def main() -> None:
        running = mgr.submit(req("first", max_new_tokens=4000))  # nothing running: the worker thread
        await running.__anext__()
        _, fin = await collect(mgr.submit(req("second", max_new_tokens=4)))  # "first" runs: a helper
        assert fin.finish_reason == "length"
        await running.aclose()

    run(main())
    assert seen["second"].startswith("ocr-prepare") and not seen["first"].startswith("ocr-prepare")
    for t in threading.enumerate():
        if t.name.startswith("ocr-prepare"):
            t.join(10)
            assert not t.is_alive(), "a prepare helper thread outlived its admission"
    run(mgr.shutdown())
