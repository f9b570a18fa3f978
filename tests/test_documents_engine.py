"""Documents in the engine (fake model): one request against the queue limits, pages as concurrent
sequences sharing the slots fairly, page order, per-page answers, usage sums, cancellation.

No timing assertions: the fake model's decode hook blocks the worker so that admissions happen in a
fixed order."""

from __future__ import annotations

import asyncio
import threading

import pytest
from PIL import Image

from deepseek_ocr_server.documents import (
    DocumentDone,
    DocumentOptions,
    Page,
    PageDelta,
    PageDone,
    page_jobs,
    run_jobs,
    run_pages,
)
from deepseek_ocr_server.engine.manager import ModelManager, Overloaded
from deepseek_ocr_server.engine.types import Finished, OcrRequest, TextDelta
from deepseek_ocr_server.testing.fake import EOS_ID, FakeOcrModel


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def pages(n: int) -> list[Page]:
    return [Page(i + 1, Image.new("RGB", (30 + i, 20), (10 * i % 256, 80, 200))) for i in range(n)]


def template(text: str = "read", **kw) -> OcrRequest:
    return OcrRequest(model_id="a", text=text, images=[], **kw)


def manager(model: FakeOcrModel, **kw) -> ModelManager:
    return ModelManager(["a"], lambda _id: model, **kw)


class Gate:
    def __init__(self) -> None:
        self.sem = threading.Semaphore(0)

    def __call__(self, model: FakeOcrModel, batch: int) -> None:
        assert self.sem.acquire(timeout=30), "test forgot to release the worker"

    def open(self) -> None:
        self.sem.release(100_000)


def test_pages_in_order_with_per_page_answers_usage_and_length() -> None:
    model = FakeOcrModel(name="doc")
    ref = FakeOcrModel(name="doc")
    mgr = manager(model, max_running=3)
    budget = 8
    doc = pages(7)
    expected = []
    for p in doc:
        prepared = ref.prepare("read", [p.image])
        greedy = ref.expected_greedy(prepared, budget)
        expected.append(
            (
                ref.expected_text(prepared, budget),
                len(greedy),
                prepared.num_prompt_tokens,
                "stop" if greedy[-1] == EOS_ID else "length",
            )
        )

    async def go():
        deltas: dict[int, list[str]] = {}
        order: list[int] = []
        done = None
        async for ev in run_pages(
            mgr, doc, template(max_new_tokens=budget), "fake", DocumentOptions(output="raw")
        ):
            if isinstance(ev, PageDelta):
                if not order or order[-1] != ev.page:
                    order.append(ev.page)
                deltas.setdefault(ev.page, []).append(ev.text)
            elif isinstance(ev, DocumentDone):
                done = ev.result
        await mgr.shutdown()
        return order, deltas, done

    order, deltas, done = run(go())
    assert order == [1, 2, 3, 4, 5, 6, 7]  # emitted in page order, each page once and whole
    assert [p.page for p in done.pages] == order
    for page, (text, generated, prompt, reason) in zip(done.pages, expected, strict=True):
        assert page.raw == text == "".join(deltas[page.page])
        assert page.completion_tokens == generated and page.prompt_tokens == prompt
        assert page.finish_reason == reason
    assert done.completion_tokens == sum(e[1] for e in expected)
    assert done.prompt_tokens == sum(e[2] for e in expected)
    reasons = {p.finish_reason for p in done.pages}
    assert reasons == {"stop", "length"}, "pick a budget where some pages stop and some are cut"
    assert done.finish_reason == "length"
    assert model.live_caches == 0


def test_a_later_single_image_is_not_starved_by_a_long_document() -> None:
    gate = Gate()
    admitted: list[str] = []
    model = FakeOcrModel(
        name="fair",
        min_answer=30,
        answer_span=1,
        on_decode=gate,
        on_prefill=lambda m, prep: admitted.append(prep.input_ids[-1]),
    )
    mgr = manager(model, max_running=2)
    doc = pages(20)

    async def go():
        first_single: list[int] = []
        events: list[str] = []

        async def read_doc():
            async for ev in run_pages(mgr, doc, template("d"), "fake"):
                if isinstance(ev, PageDone):
                    events.append(f"page{ev.result.page}")

        async def read_single():
            stream = mgr.submit(OcrRequest(model_id="a", text="s", images=[doc[0].image]))
            async for ev in stream:
                if isinstance(ev, TextDelta) and not first_single:
                    first_single.append(len(events))
                    events.append("single-first-token")
                if isinstance(ev, Finished):
                    events.append("single-done")

        doc_task = asyncio.create_task(read_doc())
        while model.prefill_calls < 1:  # the document's first page is in; the worker waits in decode
            await asyncio.sleep(0.01)
        single_task = asyncio.create_task(read_single())
        while mgr.status().queued < 2:
            await asyncio.sleep(0.01)
        gate.open()
        await asyncio.gather(doc_task, single_task)
        await mgr.shutdown()
        return events

    events = run(go())
    # the document's prompts end with "d", the single's with "s": the single took the first free slot
    assert admitted[0] == ord("d") and admitted[1] == ord("s"), admitted[:4]
    assert events.index("single-first-token") < events.index("page20")
    assert events.index("single-done") < events.index("page20")


def test_a_document_is_one_request_against_max_queued() -> None:
    gate = Gate()
    model = FakeOcrModel(name="q", on_decode=gate)
    mgr = manager(model, max_running=1, max_queued=2)

    async def go():
        busy = mgr.submit(OcrRequest(model_id="a", text="x", images=[]))
        first = await busy.__anext__()  # running: holds the only slot
        assert isinstance(first, TextDelta)
        doc = mgr.submit_group(page_jobs_requests(40))  # 40 pages, more than max_queued: accepted
        single = mgr.submit(OcrRequest(model_id="a", text="y", images=[]))
        assert mgr.status().queued == 2
        with pytest.raises(Overloaded):
            mgr.submit(OcrRequest(model_id="a", text="z", images=[]))
        gate.open()
        for stream in [busy, single, *doc]:
            async for ev in stream:
                if isinstance(ev, Finished):
                    break
        await mgr.shutdown()

    run(go())
    assert model.live_caches == 0


def page_jobs_requests(n: int) -> list[OcrRequest]:
    return [j.request for j in page_jobs(pages(n), template())]


def test_closing_a_document_cancels_every_page() -> None:
    model = FakeOcrModel(name="cancel", min_answer=400, answer_span=1, step_delay=0.002)
    mgr = manager(model, max_running=3)

    async def go():
        it = run_pages(mgr, pages(12), template(), "fake")
        async for ev in it:
            if isinstance(ev, PageDelta):
                break  # page 1 has started; pages 2 and 3 are running too, the rest wait
        await it.aclose()
        for _ in range(500):
            if mgr.status().running == 0 and model.live_caches == 0:
                break
            await asyncio.sleep(0.01)
        status = mgr.status()
        await mgr.shutdown()
        return status

    status = run(go())
    assert status.running == 0 and status.queued == 0
    assert model.live_caches == 0
    assert model.prefill_calls <= 4  # the waiting pages never started


def test_pages_waiting_behind_their_own_document_do_not_time_out() -> None:
    model = FakeOcrModel(name="slow", min_answer=20, answer_span=1, step_delay=0.01)
    mgr = manager(model, max_running=1, queue_timeout_s=0.1)  # each page takes ~0.2 s

    async def go():
        jobs = page_jobs(pages(3), template())
        results = [ev.result async for ev in run_jobs(mgr, jobs, "fake") if isinstance(ev, DocumentDone)]
        await mgr.shutdown()
        return results[0]

    done = run(go())
    assert [p.page for p in done.pages] == [1, 2, 3]
    assert all(p.completion_tokens == 21 for p in done.pages)
