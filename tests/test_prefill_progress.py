"""Both model families call ``models.base.progress()`` between the layers of vision and prefill, and a
decode step of another sequence run inside such a call (what the engine does during a long prefill)
changes nothing: the prefill gives the same logits, the other sequence the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepseek_ocr_server.models.base import progress, progress_hook
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings

TINY = VisionSettings(base_size=512, image_size=512, crop_mode=False)


def _img(seed: int, w: int = 150, h: int = 90) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _greedy(model, prepared, n: int) -> list[int]:
    logits, cache = model.prefill(prepared, n + 1)
    out = []
    for _ in range(n):
        out.append(int(torch.argmax(logits)))
        logits = model.decode([out[-1]], [cache])[0]
    cache.release()
    return out


def _check(model, first, second, min_calls: int) -> None:
    want_tokens = _greedy(model, first, 12)
    want_logits, c = model.prefill(second, 2)
    c.release()

    logits, cache = model.prefill(first, 13)
    other = [int(torch.argmax(logits))]
    calls = 0

    def step() -> None:  # one decode step of `first` in the middle of `second`'s prefill
        nonlocal logits, calls
        calls += 1
        if len(other) < 12:
            logits = model.decode([other[-1]], [cache])[0]
            other.append(int(torch.argmax(logits)))
        progress()  # not re-entered while the hook runs

    with progress_hook(step):
        got_logits, c2 = model.prefill(second, 2)
    assert calls >= min_calls
    assert torch.equal(got_logits, want_logits)
    while len(other) < 12:
        logits = model.decode([other[-1]], [cache])[0]
        other.append(int(torch.argmax(logits)))
    assert other == want_tokens
    progress()  # outside a hook: nothing happens
    cache.release()
    c2.release()


def test_deepseek_prefill_yields_between_layers(deepseek_model_f32):
    m = deepseek_model_f32
    cfg = m.config
    layers = cfg.sam.layers + cfg.clip.layers + cfg.language.num_hidden_layers
    _check(m, m.prepare("Free OCR.", [_img(1)], TINY), m.prepare("<image>\nOCR.", [_img(2)], TINY), layers)


def test_paddle_prefill_yields_between_layers(paddle_model):
    m = paddle_model
    layers = m.config.vision.num_hidden_layers + m.config.num_hidden_layers
    _check(m, m.prepare("OCR:", [_img(3)]), m.prepare("Table Recognition:", [_img(4, 120, 120)]), layers)


def test_hook_restored_after_an_error():
    calls = []
    with pytest.raises(RuntimeError), progress_hook(lambda: calls.append(1)):
        progress()
        raise RuntimeError("boom")
    progress()
    assert calls == [1]
