"""Engine behaviour under cancellation and hostile load, on the fake model (threading gates, no timing)."""

from __future__ import annotations

import asyncio
import threading

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

    def resolver(model_id: str) -> None:
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
