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
