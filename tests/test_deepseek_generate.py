"""KV-cached decoding, batched decoding of different-length sequences, and end-to-end generation on
the tiny DeepSeek-OCR checkpoint (f32, CPU)."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from deepseek_ocr_server.engine.generate import generate, generate_stream
from deepseek_ocr_server.models.base import ModelFiles, Prepared
from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrModel
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.sampling import SamplingParams
from deepseek_ocr_server.testing.generation import generate_batch

TINY = VisionSettings(base_size=512, image_size=512, crop_mode=False)
WEIGHTS = "model-00001-of-000001.safetensors"


def _page(w: int = 300, h: int = 200) -> Image.Image:
    img = Image.new("RGB", (w, h), (250, 250, 245))
    d = ImageDraw.Draw(img)
    for y in range(10, h - 10, 24):
        d.rectangle((12, y, w - 30, y + 8), fill=(20, 20, 20))
    return img


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a - b).abs().max().item()
    assert err <= 1e-4 * max(1.0, b.abs().max().item()), err


def test_cached_decode_equals_full_recompute(deepseek_model_f32):
    m = deepseek_model_f32
    prep = m.prepare("Free OCR.", [_page()], TINY)
    logits, cache = m.prefill(prep, max_new_tokens=8)
    tokens = [5, 77, 130, 4, 200]
    for i, t in enumerate(tokens):
        step = m.decode([t], [cache])[0]
        full = Prepared(input_ids=prep.input_ids + tokens[: i + 1], inputs=prep.inputs)
        want, _ = m.prefill(full, max_new_tokens=1)
        _close(step, want)
    assert cache.length == len(prep.input_ids) + len(tokens)


def test_batch_of_different_lengths_equals_each_alone(deepseek_model_f32):
    m = deepseek_model_f32
    a = m.prepare("Free OCR.", [_page()], TINY)
    b = m.prepare("the other, longer prompt without an image", [])
    assert a.num_prompt_tokens != b.num_prompt_tokens
    _, ca = m.prefill(a, 6)
    _, cb = m.prefill(b, 6)
    _, ca1 = m.prefill(a, 6)
    _, cb1 = m.prefill(b, 6)
    for ta, tb in [(5, 9), (100, 3), (7, 250)]:
        both = m.decode([ta, tb], [ca, cb])
        alone_a = m.decode([ta], [ca1])[0]
        alone_b = m.decode([tb], [cb1])[0]
        assert both.shape == (2, m.config.language.vocab_size) and both.dtype == torch.float32
        _close(both[0], alone_a)
        _close(both[1], alone_b)
    assert ca.length == ca1.length and cb.length == cb1.length


def test_decode_rejects_a_cache_at_the_context(deepseek_model_f32, monkeypatch):
    """The cache grows past its first reserve (the budget is the engine's), never past the context."""
    m = deepseek_model_f32
    prep = m.prepare("hi", [])
    monkeypatch.setattr(m, "max_context", prep.num_prompt_tokens + 2)
    _, c = m.prefill(prep, max_new_tokens=1)
    m.decode([5], [c])
    m.decode([5], [c])  # grown to the context
    assert c.length == c.capacity == m.max_context
    with pytest.raises(ValueError, match="context"):
        m.decode([5], [c])


def test_generate_end_to_end_with_image(deepseek_model_f32):
    m = deepseek_model_f32
    prep = m.prepare("<image>\n<|grounding|>Convert the document to markdown.", [_page(800, 800)])
    assert prep.inputs["images"][0].grid == (2, 2)  # tiled Gundam request
    res = generate(m, prep, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=12)
    assert res.finish_reason in ("stop", "length")
    assert res.prompt_tokens == len(prep.input_ids)
    assert res.completion_tokens == len(res.token_ids) <= 12
    # greedy from the same prefill reproduces the same ids; text is the decoding minus EOS
    again = generate(m, prep, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=12)
    assert again.token_ids == res.token_ids
    ids = [t for t in res.token_ids if t not in m.eos_token_ids and t < m.vocab_size()]
    assert res.text == m.tokenizer.decode(ids, skip_special_tokens=False)
    # streamed text == final text
    parts = list(generate_stream(m, prep, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=12))
    final = parts[-1]
    assert "".join(p for p in parts[:-1] if isinstance(p, str)) == final.text == res.text


def _greedy_by_hand(m, prep: Prepared, n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy ids from prefill + cached decode steps, ignoring end-of-sequence; and the prefill logits."""
    logits, cache = m.prefill(prep, n)
    ids = [int(torch.argmax(logits))]
    for _ in range(n - 1):
        ids.append(int(torch.argmax(m.decode([ids[-1]], [cache])[0])))
    cache.release()
    return ids, logits


@pytest.fixture
def eos_ids(deepseek_model_f32):
    """Lets a test replace the shared model's end-of-sequence set; restored afterwards."""
    m = deepseek_model_f32
    orig = m.eos_token_ids
    yield lambda ids: setattr(m, "eos_token_ids", frozenset(ids))
    m.eos_token_ids = orig


def test_finish_length_when_no_eos_is_reachable(deepseek_model_f32, eos_ids):
    """With an end-of-sequence id no logit row can produce, only the budget can end generation."""
    m = deepseek_model_f32
    prep = m.prepare("Free OCR.", [_page()], TINY)
    eos_ids({m.config.language.vocab_size + 7})
    res = generate(m, prep, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=5)
    assert res.finish_reason == "length"
    assert res.completion_tokens == len(res.token_ids) == 5
    assert res.token_ids == _greedy_by_hand(m, prep, 5)[0]


def test_finish_stop_mid_generation(deepseek_model_f32, eos_ids):
    """Make the first greedy id not seen before step 1 the end-of-sequence id: generation must stop
    exactly there, that id is reported but its text is not."""
    m = deepseek_model_f32
    prep = m.prepare("Free OCR.", [_page()], TINY)
    ids, _ = _greedy_by_hand(m, prep, 6)
    i = next((k for k in range(1, len(ids)) if ids[k] not in ids[:k]), None)
    assert i is not None, f"the tiny model repeats one id: {ids}"
    eos_ids({ids[i]})
    res = generate(m, prep, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=6)
    assert (res.finish_reason, res.token_ids, res.completion_tokens) == ("stop", ids[: i + 1], i + 1)
    shown = [t for t in ids[:i] if t < m.vocab_size()]
    assert res.text == m.tokenizer.decode(shown, skip_special_tokens=False)


def test_finish_stop_on_the_checkpoint_eos(deepseek_ckpt, deepseek_model_f32, tmp_path):
    """A checkpoint whose lm_head row for EOS (id 1, from generation_config.json) is twice the row of
    the greedy first token: the EOS logit is then twice the largest (positive) logit, so the model must
    emit EOS first and stop."""
    m = deepseek_model_f32
    prep = m.prepare("Free OCR.", [_page()], TINY)
    logits, cache = m.prefill(prep, 1)
    cache.release()
    first = int(torch.argmax(logits))
    assert first != 1 and logits[first] > 0.1
    d = shutil.copytree(deepseek_ckpt, tmp_path / "eos")
    tensors = load_file(str(d / WEIGHTS))
    tensors["lm_head.weight"][1] = 2 * tensors["lm_head.weight"][first]
    save_file(tensors, str(d / WEIGHTS))
    forced = DeepseekOcrModel.load(ModelFiles.from_dir(d), dtype=torch.float32)
    assert forced.eos_token_ids == frozenset({1})
    res = generate(forced, prep, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=4)
    assert (res.finish_reason, res.token_ids, res.completion_tokens, res.text) == ("stop", [1], 1, "")


def test_generate_batch_equals_single_and_seeded_sampling(deepseek_model_f32):
    m = deepseek_model_f32
    a = m.prepare("Free OCR.", [_page()], TINY)
    b = m.prepare("the text only prompt", [])
    greedy = SamplingParams(no_repeat_ngram_size=3)
    batch = generate_batch(m, [a, b], greedy, max_new_tokens=[6, 4])
    assert [r.token_ids for r in batch] == [
        generate(m, a, greedy, 6).token_ids,
        generate(m, b, greedy, 4).token_ids,
    ]
    sp = SamplingParams(
        do_sample=True, temperature=0.9, top_p=0.9, top_k=50, seed=1234, no_repeat_ngram_size=0
    )
    assert generate(m, a, sp, 6).token_ids == generate(m, a, sp, 6).token_ids


def test_bf16_model_runs(deepseek_ckpt):
    m = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16)
    m32 = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.float32)
    prep = m.prepare("Free OCR.", [_page()], TINY)
    l16, c = m.prefill(prep, 4)
    l32, _ = m32.prefill(prep, 4)
    assert l16.dtype == torch.float32 and torch.isfinite(l16).all()
    assert torch.corrcoef(torch.stack([l16, l32]))[0, 1] > 0.98
    assert c.k.dtype == c.v.dtype == torch.float32  # CPU: float32 cache (exact widening, fast decode)
    step = m.decode([5], [c])[0]
    full, _ = m.prefill(Prepared(prep.input_ids + [5], prep.inputs), 1)
    assert torch.isfinite(step).all()
    assert (step - full).abs().max() <= 0.05 * full.abs().max()  # bf16: cached decode ~ recompute


def test_prefill_in_two_chunks_equals_one(deepseek_model_f32):
    """The decoder can continue a prefill on a non-empty cache (causal mask offset by the cached length)."""
    m = deepseek_model_f32
    net = m.net.model
    x = torch.randn(30, m.config.language.hidden_size, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        one = net.new_cache(32, torch.float32, "cpu")
        want = net.prefill(x.clone(), *m.rope(torch.arange(30)), one)
        two = net.new_cache(32, torch.float32, "cpu")
        net.prefill(x[:17].clone(), *m.rope(torch.arange(17)), two)
        got = net.prefill(x[17:].clone(), *m.rope(torch.arange(17, 30)), two)
    _close(got, want[17:])
    assert two.length == one.length == 30
