"""The fake model itself: deterministic, prompt-dependent, batch-safe, caches released."""

from __future__ import annotations

import pytest
from PIL import Image

from deepseek_ocr_server.engine.generate import generate
from deepseek_ocr_server.models import load_model
from deepseek_ocr_server.models.base import InputError
from deepseek_ocr_server.sampling import SamplingParams
from deepseek_ocr_server.testing.fake import EOS_ID, FakeOcrModel, write_fake_checkpoint
from deepseek_ocr_server.testing.generation import generate_batch


def test_greedy_matches_expected_and_stops():
    m = FakeOcrModel()
    p = m.prepare("Free OCR.", [Image.new("RGB", (32, 20), "white")])
    assert p.input_ids.count(258) == m.image_tokens
    r = generate(m, p, max_new_tokens=100)
    assert r.finish_reason == "stop"
    assert r.token_ids == m.expected_greedy(p) and r.token_ids[-1] == EOS_ID
    assert r.text == m.expected_text(p) and len(r.text) == m.answer_length(p)
    short = generate(m, p, max_new_tokens=2)
    assert short.finish_reason == "length" and short.text == r.text[:2]
    assert m.live_caches == 0


def test_prompt_and_image_change_answer():
    m = FakeOcrModel()
    a = m.expected_text(m.prepare("one", []))
    b = m.expected_text(m.prepare("two", []))
    c = m.expected_text(m.prepare("one", [Image.new("RGB", (8, 8), "black")]))
    d = m.expected_text(m.prepare("one", [Image.new("RGB", (8, 8), "white")]))
    assert len({a, b, c, d}) == 4
    assert FakeOcrModel(name="other").expected_text(m.prepare("one", [])) != a


def test_batch_equals_alone():
    m = FakeOcrModel()
    ps = [m.prepare(f"prompt {i}" * (i + 1), []) for i in range(6)]
    budgets = [100, 5, 100, 100, 3, 100]
    batch = generate_batch(m, ps, max_new_tokens=budgets)
    for p, n, r in zip(ps, budgets, batch, strict=True):
        assert r.token_ids == generate(m, p, max_new_tokens=n).token_ids == m.expected_greedy(p, n)
    assert max(m.batch_sizes) > 1 and m.live_caches == 0


def test_sampling_is_seeded():
    m = FakeOcrModel()
    p = m.prepare("sample me", [])
    sp = SamplingParams(do_sample=True, temperature=1.5, seed=7)
    outs = {generate(m, p, SamplingParams(do_sample=True, temperature=1.5, seed=s), 40).text for s in range(6)}
    assert len(outs) > 1
    assert generate(m, p, sp, 40).text == generate(m, p, sp, 40).text


def test_input_errors():
    m = FakeOcrModel(max_images=1, max_context=64)
    img = Image.new("RGB", (4, 4))
    with pytest.raises(InputError):
        m.prepare("x", [img, img])
    with pytest.raises(InputError):
        m.prepare("<image> <image>", [img])
    with pytest.raises(InputError):
        m.prepare("x" * 100, [])


def test_load_from_checkpoint(tmp_path):
    files = write_fake_checkpoint(tmp_path / "ck", name="ck", step_delay=0.0)
    m = load_model("fake", files)
    assert isinstance(m, FakeOcrModel) and m.name == "ck"
    assert m.tokenizer.get_vocab_size(with_added_tokens=True) == 259
