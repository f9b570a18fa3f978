"""The scheduler with the real model families on their tiny random checkpoints: batched answers equal
the answers alone, cancellation releases caches, int8 decoders load and generate."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepseek_ocr_server.engine.generate import generate
from deepseek_ocr_server.engine.manager import ModelManager
from deepseek_ocr_server.engine.types import Finished, OcrRequest, TextDelta
from deepseek_ocr_server.models import load_model
from deepseek_ocr_server.models.base import ModelFiles, OcrModel, no_pause
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.models.quant import Int8Linear
from deepseek_ocr_server.models.registry import family
from deepseek_ocr_server.sampling import SamplingParams

KINDS = {"deepseek-ocr": "deepseek_ckpt", "paddleocr-vl": "paddle_ckpt"}
# DeepSeek-OCR: small views so the tiny model's vision stays cheap; images of different sizes give
# different numbers of image tokens (mixed prompt lengths)
VISION = VisionSettings(base_size=512, image_size=512, crop_mode=False)


def ckpt(request: pytest.FixtureRequest, kind: str) -> Path:
    return request.getfixturevalue(KINDS[kind])


def load(path: Path, kind: str, **kw) -> OcrModel:
    return load_model(kind, ModelFiles.from_dir(path), device="cpu", dtype=torch.float32, **kw)


def image(i: int) -> Image.Image:
    w, h = [(64, 48), (40, 90), (120, 60), (56, 56), (90, 140)][i % 5]
    img = Image.new("RGB", (w, h), (30 * i % 255, 200, 90))
    img.paste((250, 20, 20), (4, 4, w // 2, h // 3))
    return img


CASES = [  # prompt, image index, sampling, budget
    ("Free OCR.", 0, SamplingParams(), 12),
    ("OCR:", 1, SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=3), 7),
    ("Describe.", 2, SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=3), 10),
    ("Table Recognition:", 3, SamplingParams(do_sample=True, temperature=1.2, top_k=20, seed=11), 4),
    ("Text.", 4, SamplingParams(), 9),
]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


async def collect(stream) -> Finished:
    text = ""
    async for ev in stream:
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, Finished):
            assert ev.text == text
            return ev
    raise AssertionError("no Finished event")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_batched_equals_alone(request, kind):
    path = ckpt(request, kind)
    model = load(path, kind)
    prepared = [model.prepare(t, [image(i)], VISION) for t, i, _, _ in CASES]
    assert len({p.num_prompt_tokens for p in prepared}) >= 3  # mixed prompt lengths
    alone = [generate(model, p, sp, n) for p, (_, _, sp, n) in zip(prepared, CASES, strict=True)]

    batches: list[int] = []
    decode = model.decode

    def spy(tokens, caches):
        batches.append(len(tokens))
        return decode(tokens, caches)

    model.decode = spy  # type: ignore[method-assign]
    gate = threading.Event()
    mgr = ModelManager([kind], lambda _id: gate.wait(60) and model, max_running=4)

    async def main():
        streams = [
            mgr.submit(OcrRequest(kind, t, [image(i)], VISION, sp, n)) for t, i, sp, n in CASES
        ]
        gate.set()
        return await asyncio.gather(*(collect(s) for s in streams))

    got = run(main())
    for fin, ref in zip(got, alone, strict=True):
        assert fin.text == ref.text
        assert (fin.finish_reason, fin.completion_tokens, fin.prompt_tokens) == (
            ref.finish_reason, ref.completion_tokens, ref.prompt_tokens,
        )
    assert max(batches) == 4  # really batched, up to max_running
    run(mgr.shutdown())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cancel_mid_batch_real_model(request, kind):
    model = load(ckpt(request, kind), kind)
    released: list[int] = []
    prefill = model.prefill

    prefilled: list[int] = []
    both_prefilled = threading.Event()

    def spy_prefill(prepared, max_new_tokens, between_layers=no_pause):
        logits, cache = prefill(prepared, max_new_tokens, between_layers)
        prefilled.append(1)
        if len(prefilled) == 2:
            both_prefilled.set()
        release = cache.release

        def rel():
            released.append(1)
            release()

        cache.release = rel  # type: ignore[method-assign]
        return logits, cache

    model.prefill = spy_prefill  # type: ignore[method-assign]
    ref = generate(model, model.prepare("Free OCR.", [image(0)], VISION), SamplingParams(), 20)
    released.clear()
    prefilled.clear()
    steps = threading.Semaphore(1)  # the worker decodes only as far as the test lets it
    decode = model.decode

    def gated_decode(tokens, caches):
        assert steps.acquire(timeout=60)
        return decode(tokens, caches)

    model.decode = gated_decode  # type: ignore[method-assign]
    mgr = ModelManager([kind], lambda _id: model, max_running=4)

    async def main():
        keep = mgr.submit(OcrRequest(kind, "Free OCR.", [image(0)], VISION, SamplingParams(), 20))
        drop = mgr.submit(OcrRequest(kind, "OCR:", [image(1)], VISION, SamplingParams(), 20))
        # keep is prefilled, decodes one step, then drop is prefilled; the worker waits in step 2
        assert await asyncio.to_thread(both_prefilled.wait, 60)
        await drop.aclose()  # the client goes away mid-batch
        steps.release(1000)
        return await collect(keep)

    fin = run(main())
    assert fin.text == ref.text
    assert len(released) == 2  # the cancelled sequence released its cache too
    assert mgr.status().running == 0
    run(mgr.shutdown())


def greedy_ids(model: OcrModel, prepared, steps: int) -> list[int]:
    seq = generate(model, prepared, SamplingParams(no_repeat_ngram_size=0), steps)
    return seq.token_ids


def teacher_forced_agreement(ref: OcrModel, other: OcrModel, prepared, tokens: list[int]) -> float:
    """Fraction of steps where ``other`` picks ``ref``'s greedy token, feeding ``ref``'s tokens to both."""
    same = 0
    logits, cache = other.prefill(prepared, len(tokens) + 1)
    try:
        for t in tokens:
            same += int(torch.argmax(logits).item() == t)
            logits = other.decode([t], [cache])[0]
    finally:
        cache.release()
    return same / len(tokens)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_int8_loads_and_generates(request, kind):
    path = ckpt(request, kind)
    ref = load(path, kind)
    q = load(path, kind, quantize="int8")
    names = [name for name, m in q.net.named_modules() if isinstance(m, Int8Linear)]
    assert names and not any(family(kind).is_vision(name) for name in names)  # vision untouched
    prepared = q.prepare("Free OCR.", [image(2)], VISION)
    tokens = greedy_ids(ref, prepared, 64)
    agreement = teacher_forced_agreement(ref, q, prepared, tokens)
    assert agreement >= 0.9, agreement
    # and it serves through the scheduler like any model
    mgr = ModelManager([kind], lambda _id: q)

    async def main():
        return await collect(mgr.submit(OcrRequest(kind, "Free OCR.", [image(2)], VISION, SamplingParams(), 16)))

    fin = run(main())
    assert fin.completion_tokens >= 1 and fin.finish_reason in ("stop", "length")
    run(mgr.shutdown())
