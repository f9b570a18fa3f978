"""Scheduler + ModelManager on the fake model: batching, cancellation, admission control, swaps, metrics.

Tests never assert on timing: the fake model's hooks block the worker thread (threading primitives) so
that the order of admissions and decode steps is fixed.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from PIL import Image
from prometheus_client import REGISTRY

from deepseek_ocr_server.engine.generate import generate
from deepseek_ocr_server.engine.manager import (
    BadRequest,
    ModelManager,
    ModelUnavailable,
    Overloaded,
    QueueTimeout,
    UnknownModel,
)
from deepseek_ocr_server.engine.types import Failed, Finished, OcrRequest, TextDelta
from deepseek_ocr_server.models.base import ModelLoadError
from deepseek_ocr_server.sampling import SamplingParams
from deepseek_ocr_server.testing.fake import FakeOcrModel


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def collect(stream, prefix: str = "") -> tuple[str, Finished]:
    parts: list[str] = [prefix] if prefix else []
    async for ev in stream:
        if isinstance(ev, TextDelta):
            parts.append(ev.text)
        elif isinstance(ev, Finished):
            assert ev.text == "".join(parts)
            return ev.text, ev
        else:
            raise AssertionError(f"unexpected {ev!r}")
    raise AssertionError("stream ended without Finished")


class Gate:
    """Blocks the worker at each decode step until the test releases permits."""

    def __init__(self, permits: int = 0) -> None:
        self.sem = threading.Semaphore(permits)

    def __call__(self, model: FakeOcrModel, batch: int) -> None:
        assert self.sem.acquire(timeout=30), "test forgot to release the worker"

    def release(self, n: int = 1) -> None:
        self.sem.release(n)


def manager_for(
    models: dict[str, FakeOcrModel], loads: list[str] | None = None, gate: threading.Event | None = None, **kw
) -> ModelManager:
    def loader(model_id: str) -> FakeOcrModel:
        if gate is not None:
            assert gate.wait(30)
        if loads is not None:
            loads.append(model_id)
        m = models[model_id]
        if isinstance(m, Exception):
            raise m
        return m

    return ModelManager(list(models), loader, **kw)


def req(text: str, model: str = "a", **kw) -> OcrRequest:
    return OcrRequest(model_id=model, text=text, images=kw.pop("images", []), **kw)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- batching -------------------------------------------------------------------------------------


def test_batch_equals_alone_mixed_settings():
    model = FakeOcrModel(name="a", min_answer=6, answer_span=30)
    ref = FakeOcrModel(name="a", min_answer=6, answer_span=30)
    cases = []
    for i in range(10):
        prompt = f"page {i} " + "x" * (i * 7)  # mixed prompt lengths
        imgs = [Image.new("RGB", (16 + i, 16), (i * 20, 0, 0))] if i % 3 == 0 else []
        sp = [
            SamplingParams(),
            SamplingParams(do_sample=True, temperature=1.3, top_p=0.9, seed=i),
            SamplingParams(do_sample=True, temperature=0.8, top_k=5, seed=100 + i),
            SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=3),
        ][i % 4]
        budget = [200, 4, 9, 200, 200][i % 5]  # some hit the length budget
        p = ref.prepare(prompt, imgs)
        greedy = ref.expected_text(p)
        stop = [greedy[3:5]] if i in (3, 8) and len(greedy) > 6 else []  # finish on a stop string
        cases.append((prompt, imgs, sp, budget, stop))
    alone = [generate(ref, ref.prepare(t, im), sp, n, st) for t, im, sp, n, st in cases]
    assert {r.finish_reason for r in alone} == {"stop", "length"}

    loaded = threading.Event()
    mgr = manager_for({"a": model}, gate=loaded, max_running=6)

    async def main():
        streams = [
            mgr.submit(req(t, images=im, sampling=sp, max_new_tokens=n, stop=st)) for t, im, sp, n, st in cases
        ]
        loaded.set()
        return await asyncio.gather(*(collect(s) for s in streams))

    got = run(main())
    for (text, fin), r in zip(got, alone, strict=True):
        assert text == r.text
        assert fin.finish_reason == r.finish_reason
        assert fin.completion_tokens == r.completion_tokens and fin.prompt_tokens == r.prompt_tokens
    assert max(model.batch_sizes) > 1
    assert max(model.batch_sizes) <= 6
    assert model.live_caches == 0
    run(mgr.shutdown())


def test_one_prefill_between_decode_steps():
    gate = threading.Event()
    model = FakeOcrModel(name="a", min_answer=20, answer_span=1, on_prefill=lambda m, p: gate.wait(30))
    mgr = manager_for({"a": model}, max_running=8)

    async def main():
        streams = [mgr.submit(req(f"q{i}")) for i in range(5)]
        gate.set()  # every request is queued before the first prefill
        return await asyncio.gather(*(collect(s) for s in streams))

    run(main())
    # one admission per decode step: the batch grows by one each step
    assert model.batch_sizes[:5] == [1, 2, 3, 4, 5]
    assert model.live_caches == 0
    run(mgr.shutdown())


def _long_prefill_run(slice_s: float) -> tuple[FakeOcrModel, list[tuple[str, Finished]]]:
    """A runs alone; B (a prefill of 6 "layers", 0.3 s in all) is admitted while A decodes."""
    model = FakeOcrModel(
        name="a", min_answer=40, answer_span=1, prefill_layers=6, prefill_delay=0.3, step_delay=0.002
    )
    mgr = manager_for({"a": model}, max_running=4, prefill_slice_s=slice_s)

    async def main():
        a = mgr.submit(req("first page"))
        first = await a.__anext__()  # A is running before B arrives
        assert isinstance(first, TextDelta)
        b = mgr.submit(req("second page", max_new_tokens=5))
        return await asyncio.gather(collect(a, first.text), collect(b))

    got = run(main())
    run(mgr.shutdown())
    assert model.live_caches == 0
    return model, got


def test_running_streams_decode_during_a_long_prefill():
    ref = FakeOcrModel(name="a", min_answer=40, answer_span=1)
    want = [generate(ref, ref.prepare(t, []), SamplingParams(), n) for t, n in (("first page", 256), ("second page", 5))]
    # slice 0: a decode step for the running streams at every layer boundary of B's prefill
    model, got = _long_prefill_run(0.0)
    assert model.decodes_during_prefill >= 6
    # nothing changes in the answers: A keeps its tokens, B's prefill is the same prefill
    assert [(t, f.finish_reason) for t, f in got] == [(w.text, w.finish_reason) for w in want]
    # a slice longer than any prefill: no decode step inside one (the bound of the previous engine);
    # the step-gap histogram sees A wait the whole 0.3 s prefill
    gaps0 = sample("ocr_decode_step_gap_seconds_count")
    long0 = gaps0 - sample("ocr_decode_step_gap_seconds_bucket", le="0.25")
    model, got = _long_prefill_run(3600.0)
    assert model.decodes_during_prefill == 0
    assert [t for t, _ in got] == [w.text for w in want]
    gaps = sample("ocr_decode_step_gap_seconds_count")
    assert gaps >= gaps0 + 38  # A's steps after its first one (B's first step has no gap yet)
    assert gaps - sample("ocr_decode_step_gap_seconds_bucket", le="0.25") >= long0 + 1


# --- cancellation ---------------------------------------------------------------------------------


def test_cancel_mid_batch_frees_slot():
    gate = Gate()
    model = FakeOcrModel(name="a", min_answer=30, answer_span=1, on_decode=gate)
    ref = FakeOcrModel(name="a", min_answer=30, answer_span=1)
    loaded = threading.Event()
    mgr = manager_for({"a": model}, gate=loaded, max_running=3)
    cancelled_before = sample("ocr_cancelled_requests_total")

    async def main():
        a, b, c = (mgr.submit(req(t)) for t in ("alpha", "beta", "gamma"))
        loaded.set()
        gate.release(2)  # admit a, step, admit b, step, admit c
        firsts = [await s.__anext__() for s in (a, b, c)]
        assert all(isinstance(f, TextDelta) for f in firsts)
        await b.aclose()
        assert [ev async for ev in b] == []
        gate.release(1000)
        return await asyncio.gather(collect(a, firsts[0].text), collect(c, firsts[2].text))

    (ta, _), (tc, _) = run(main())
    assert ta == ref.expected_text(ref.prepare("alpha", []))
    assert tc == ref.expected_text(ref.prepare("gamma", []))
    sizes = model.batch_sizes
    assert sizes[:2] == [1, 2] and sizes.count(3) <= 1 and all(s <= 2 for s in sizes[3:])
    assert sum(sizes) < 3 * 30  # b was not decoded to its end
    assert model.live_caches == 0
    assert sample("ocr_cancelled_requests_total") == cancelled_before + 1
    run(mgr.shutdown())


def test_task_cancel_and_queued_cancel():
    gate = Gate()
    model = FakeOcrModel(name="a", min_answer=30, answer_span=1, on_decode=gate)
    mgr = manager_for({"a": model}, max_running=1)

    async def main():
        a = mgr.submit(req("first"))
        assert isinstance(await a.__anext__(), TextDelta)  # a runs; the worker waits in its first step
        b = mgr.submit(req("second"))
        assert mgr.status().queued == 1
        task = asyncio.ensure_future(b.__anext__())
        await asyncio.sleep(0)
        task.cancel()  # the client's task is cancelled while waiting
        with pytest.raises(asyncio.CancelledError):
            await task
        assert mgr.status().queued == 0
        c = mgr.submit(req("third"))
        await a.aclose()
        gate.release(1000)
        return await collect(c)

    text, fin = run(main())
    assert fin.finish_reason == "stop" and len(text) == 30
    assert model.prefill_calls == 2  # "second" never ran
    assert model.live_caches == 0
    run(mgr.shutdown())


# --- admission control ----------------------------------------------------------------------------


def test_queue_full_is_429_with_retry_after():
    gate = Gate()
    model = FakeOcrModel(name="a", min_answer=5, answer_span=1, on_decode=gate)
    mgr = manager_for({"a": model}, max_running=1, max_queued=2)
    before = sample("ocr_rejected_requests_total", reason="overloaded")

    async def main():
        a = mgr.submit(req("a"))
        first = (await a.__anext__()).text
        b, c = mgr.submit(req("b")), mgr.submit(req("c"))
        with pytest.raises(Overloaded) as exc:
            mgr.submit(req("d"))
        assert exc.value.status == 429 and exc.value.retry_after >= 1
        gate.release(1000)
        outs = await asyncio.gather(collect(a, first), collect(b), collect(c))
        d = await collect(mgr.submit(req("d")))  # room again
        return outs, d

    outs, d = run(main())
    assert all(f.finish_reason == "stop" for _, f in outs) and d[1].finish_reason == "stop"
    assert sample("ocr_rejected_requests_total", reason="overloaded") == before + 1
    run(mgr.shutdown())


def test_queue_timeout():
    gate = Gate()
    model = FakeOcrModel(name="a", min_answer=5, answer_span=1, on_decode=gate)
    mgr = manager_for({"a": model}, max_running=1, queue_timeout_s=0.05)

    async def main():
        a = mgr.submit(req("a"))
        first = (await a.__anext__()).text
        b = mgr.submit(req("b"))
        with pytest.raises(QueueTimeout) as exc:
            await b.__anext__()  # a holds the only slot until the test releases the worker
        assert exc.value.status == 503
        gate.release(1000)
        return await collect(a, first)

    text, fin = run(main())
    assert fin.finish_reason == "stop"
    assert mgr.status().queued == 0 and model.prefill_calls == 1
    run(mgr.shutdown())


def test_errors_before_first_event():
    model = FakeOcrModel(name="a", max_images=1)
    mgr = manager_for({"a": model, "b": FakeOcrModel(name="b")})

    async def main():
        with pytest.raises(UnknownModel) as exc:
            mgr.submit(req("x", model="nope"))
        assert exc.value.status == 404 and "a, b" in exc.value.message
        img = Image.new("RGB", (4, 4))
        s = mgr.submit(req("x", images=[img, img]))
        with pytest.raises(BadRequest) as exc2:
            await s.__anext__()
        assert exc2.value.status == 400 and "too many images" in exc2.value.message
        with pytest.raises(BadRequest):
            mgr.submit(req("x", sampling=SamplingParams(top_p=2.0)))
        return await collect(mgr.submit(req("x")))  # still serving

    run(main())
    assert model.live_caches == 0
    run(mgr.shutdown())


def test_long_prompt_budget_clamped_to_context():
    model = FakeOcrModel(name="a", max_context=40, min_answer=200, answer_span=1)
    mgr = manager_for({"a": model})

    async def main():
        ok = await collect(mgr.submit(req("abc", max_new_tokens=1000)))
        s = mgr.submit(req("y" * 60))
        with pytest.raises(BadRequest):
            await s.__anext__()
        return ok

    text, fin = run(main())
    assert fin.finish_reason == "length" and fin.prompt_tokens + fin.completion_tokens == 40
    run(mgr.shutdown())


# --- model swaps ----------------------------------------------------------------------------------


def test_swap_with_concurrent_requests_for_two_models():
    models = {"a": FakeOcrModel(name="a"), "b": FakeOcrModel(name="b")}
    refs = {"a": FakeOcrModel(name="a"), "b": FakeOcrModel(name="b")}
    loads: list[str] = []
    loaded = threading.Event()
    mgr = manager_for(models, loads, loaded, max_running=4)
    ids = ["a", "b"] * 5

    async def main():
        streams = [mgr.submit(req(f"doc {i}", model=m)) for i, m in enumerate(ids)]
        loaded.set()  # all of them arrive while the first model loads
        return await asyncio.gather(*(collect(s) for s in streams))

    outs = run(main())
    for i, (m, (text, _)) in enumerate(zip(ids, outs, strict=True)):
        assert text == refs[m].expected_text(refs[m].prepare(f"doc {i}", []))
        assert text != refs["b" if m == "a" else "a"].expected_text(refs[m].prepare(f"doc {i}", []))
    # interleaved arrivals are served in per-model cohorts, not one swap per request
    assert loads == ["a", "b"]
    assert all(m.live_caches == 0 for m in models.values())
    assert mgr.status().model_id == loads[-1] and mgr.status().state == "ready"
    run(mgr.shutdown())


def test_swap_waits_for_running_and_keeps_order():
    gate = Gate()
    a = FakeOcrModel(name="a", min_answer=10, answer_span=1, on_decode=gate)
    b = FakeOcrModel(name="b", min_answer=4, answer_span=1)
    loads: list[str] = []
    mgr = manager_for({"a": a, "b": b}, loads, max_running=4)

    async def main():
        first = mgr.submit(req("a1"))
        head = (await first.__anext__()).text  # "a" loaded, a1 running, worker waits in its first decode step
        sb = mgr.submit(req("b1", model="b"))
        late_a = mgr.submit(req("a2"))  # arrived after a request for "b": must not jump ahead of it
        assert mgr.status().model_id == "a"
        gate.release(1000)
        return await asyncio.gather(collect(first, head), collect(sb), collect(late_a))

    (t1, f1), (tb, fb), (t2, f2) = run(main())
    assert loads == ["a", "b", "a"]
    assert len(t1) == 10 and len(tb) == 4 and len(t2) == 10
    assert a.prefill_calls == 2 and b.prefill_calls == 1
    assert sample("ocr_model_swaps_total") >= 3
    run(mgr.shutdown())


def test_failed_model_is_503_and_others_keep_working():
    loads: list[str] = []
    mgr = manager_for({"a": FakeOcrModel(name="a"), "bad": ModelLoadError("weights missing")}, loads)

    async def main():
        s = mgr.submit(req("x", model="bad"))
        with pytest.raises(ModelUnavailable) as exc:
            await s.__anext__()
        assert exc.value.status == 503 and "failed to load" in exc.value.message  # the reason is for the log
        assert "weights missing" not in exc.value.message
        st = mgr.status()
        assert st.state == "failed" and "weights missing" in (st.error or "") and "bad" in st.failed
        with pytest.raises(ModelUnavailable):
            mgr.submit(req("x", model="bad"))  # at once, without reloading
        return await collect(mgr.submit(req("x", model="a")))

    text, fin = run(main())
    assert fin.finish_reason == "stop"
    assert loads == ["bad", "a"]
    assert mgr.status().as_dict()["failed"] == {"bad": mgr.status().failed["bad"]}
    run(mgr.shutdown())


def test_preload_and_shutdown():
    gate = Gate()
    a = FakeOcrModel(name="a", min_answer=5, answer_span=1, on_decode=gate)
    mgr = manager_for({"a": a}, max_running=1)

    async def main():
        await mgr.preload("a")
        for _ in range(200):
            if mgr.status().state == "ready":
                break
            await asyncio.sleep(0.01)
        assert mgr.status().as_dict()["model"] == "a" and mgr.status().state == "ready"
        s1 = mgr.submit(req("one"))
        await s1.__anext__()
        s2 = mgr.submit(req("two"))
        stop = asyncio.ensure_future(mgr.shutdown())
        with pytest.raises(ModelUnavailable):
            await s2.__anext__()
        gate.release(1000)
        await stop
        rest = [ev async for ev in s1]
        assert rest and isinstance(rest[-1], Failed | Finished)
        with pytest.raises(ModelUnavailable):
            mgr.submit(req("three"))

    run(main())
    assert a.live_caches == 0


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_change_when_serving():
    model = FakeOcrModel(name="m1")
    mgr = manager_for({"m1": model})
    gen0 = sample("ocr_generated_tokens_total", model="m1")
    prompt0 = sample("ocr_prompt_tokens_total", model="m1")
    ttft0 = sample("ocr_time_to_first_token_seconds_count")
    lat0 = sample("ocr_request_latency_seconds_count")
    load0 = sample("ocr_model_load_seconds_count", model="m1")
    prefill0 = sample("ocr_prefill_seconds_count")
    steps0 = sum(sample("ocr_decode_steps_total", batch=str(b)) for b in range(1, 9))

    async def main():
        return await collect(mgr.submit(req("count me", model="m1")))

    text, fin = run(main())
    assert sample("ocr_generated_tokens_total", model="m1") == gen0 + fin.completion_tokens
    assert sample("ocr_prompt_tokens_total", model="m1") == prompt0 + fin.prompt_tokens
    assert sample("ocr_time_to_first_token_seconds_count") == ttft0 + 1
    assert sample("ocr_request_latency_seconds_count") == lat0 + 1
    assert sample("ocr_model_load_seconds_count", model="m1") == load0 + 1
    assert sample("ocr_queue_depth") == 0 and sample("ocr_running_sequences") == 0
    assert sample("ocr_prefill_seconds_count") == prefill0 + 1
    # one decode step per token after the first (the prefill chose the first)
    assert sum(sample("ocr_decode_steps_total", batch=str(b)) for b in range(1, 9)) == steps0 + fin.completion_tokens - 1
    run(mgr.shutdown())


class SplitCharFake(FakeOcrModel):
    """Answers start with "一" (3 UTF-8 bytes = 3 tokens): the first token alone has no text."""

    def _target(self, cache):
        i = cache.length - cache.prompt_len
        return (0xE4, 0xB8, 0x80)[i] if i < 3 else super()._target(cache)


def test_first_token_makes_an_event_even_without_text():
    gate = Gate()
    model = SplitCharFake(name="a", min_answer=6, answer_span=1, on_decode=gate)
    mgr = manager_for({"a": model})

    async def main():
        s = mgr.submit(req("x"))
        first = await s.__anext__()  # the worker is blocked in its first decode step: prefill only
        assert isinstance(first, TextDelta) and first.text == ""
        gate.release(1000)
        return await collect(s)

    text, fin = run(main())
    assert text.startswith("一") and fin.finish_reason == "stop"
    run(mgr.shutdown())
