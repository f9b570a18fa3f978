"""Cached decoding, batching across sequences of different lengths, and the shared generation loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from deepseek_ocr_server.engine.generate import generate, generate_stream
from deepseek_ocr_server.models.base import ModelFiles, Prepared
from deepseek_ocr_server.models.common.cache import KVCache
from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel
from deepseek_ocr_server.models.paddleocr_vl.processor import mrope_positions
from deepseek_ocr_server.sampling import SamplingParams
from deepseek_ocr_server.testing.generation import generate_batch


def _img(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _greedy(model: PaddleOcrVlModel, prepared: Prepared, n: int) -> tuple[list[int], list[torch.Tensor]]:
    logits, cache = model.prefill(prepared, n)
    toks, all_logits = [], [logits]
    for _ in range(n):
        toks.append(int(torch.argmax(logits)))
        logits = model.decode([toks[-1]], [cache])[0]
        all_logits.append(logits)
    return toks, all_logits


def test_cached_decode_equals_recompute(paddle_model: PaddleOcrVlModel) -> None:
    prepared = paddle_model.prepare("OCR:", [_img(150, 90, 0)])
    toks, logits = _greedy(paddle_model, prepared, 8)
    ids = prepared.input_ids + toks
    grids = prepared.inputs["grids"]
    pos, delta = mrope_positions(ids, grids, paddle_model.config.image_token_id, 2)
    full = Prepared(ids, dict(prepared.inputs, positions=pos, rope_delta=delta))
    recomputed, cache = paddle_model.prefill(full, 1)
    torch.testing.assert_close(logits[-1], recomputed, atol=1e-4, rtol=0)
    assert cache.length == len(ids)


def test_batch_of_two_equals_each_alone(paddle_model: PaddleOcrVlModel) -> None:
    a = paddle_model.prepare("OCR:", [_img(150, 90, 1)])
    b = paddle_model.prepare("Table Recognition:", [_img(90, 300, 2), _img(60, 60, 3)], system="sys")
    assert len(a.input_ids) != len(b.input_ids)
    steps = 8
    alone = [_greedy(paddle_model, p, steps) for p in (a, b)]
    la, ca = paddle_model.prefill(a, steps)
    lb, cb = paddle_model.prefill(b, steps)
    ta, tb = int(torch.argmax(la)), int(torch.argmax(lb))
    for step in range(steps):
        assert [ta, tb] == [alone[0][0][step], alone[1][0][step]]
        out = paddle_model.decode([ta, tb], [ca, cb])
        assert out.shape == (2, paddle_model.config.vocab_size) and out.dtype == torch.float32
        torch.testing.assert_close(out[0], alone[0][1][step + 1], atol=5e-5, rtol=0)
        torch.testing.assert_close(out[1], alone[1][1][step + 1], atol=5e-5, rtol=0)
        ta, tb = int(torch.argmax(out[0])), int(torch.argmax(out[1]))
    assert ca.length == len(a.input_ids) + steps and cb.length == len(b.input_ids) + steps


def test_cache_grows_beyond_initial_capacity(paddle_model: PaddleOcrVlModel, monkeypatch) -> None:
    import deepseek_ocr_server.models.common.cache as mod

    prepared = paddle_model.prepare("OCR:", [_img(150, 90, 4)])
    ref_toks, ref_logits = _greedy(paddle_model, prepared, 6)
    monkeypatch.setattr(mod, "INITIAL_DECODE_RESERVE", 1)
    logits, cache = paddle_model.prefill(prepared, 6)
    assert isinstance(cache, KVCache) and cache.capacity == len(prepared.input_ids) + 1
    for t, ref in zip(ref_toks, ref_logits[1:], strict=True):
        logits = paddle_model.decode([t], [cache])[0]
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    assert cache.capacity >= cache.length
    cache.release()
    with pytest.raises(RuntimeError):
        paddle_model.decode([1], [cache])


def test_generate_length_and_stop(paddle_model: PaddleOcrVlModel) -> None:
    prepared = paddle_model.prepare("OCR:", [_img(150, 90, 5)])
    toks, _ = _greedy(paddle_model, prepared, 6)
    res = generate(paddle_model, prepared, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=6)
    assert res.finish_reason == "length"
    assert res.token_ids == toks and res.completion_tokens == 6
    assert res.prompt_tokens == len(prepared.input_ids)

    stop_at = toks[3]
    model = copy.copy(paddle_model)
    model.eos_token_ids = frozenset({stop_at})
    first = toks.index(stop_at)
    res = generate(model, prepared, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=6)
    assert res.finish_reason == "stop"
    assert res.token_ids == toks[: first + 1] and res.completion_tokens == first + 1


def test_streamed_text_equals_final_text(paddle_model: PaddleOcrVlModel) -> None:
    # random sampling over a random model also produces invalid UTF-8 byte runs (DecodeStream edge cases)
    prepared = paddle_model.prepare("OCR:", [_img(120, 120, 6)])
    pieces, final = [], None
    for item in generate_stream(
        paddle_model, prepared, SamplingParams(do_sample=True, temperature=1.0, seed=7), max_new_tokens=24
    ):
        if isinstance(item, str):
            pieces.append(item)
        else:
            final = item
    assert final is not None and final.completion_tokens >= 1
    assert "".join(pieces) == final.text
    assert final.text


def test_generate_batch_matches_single(paddle_model: PaddleOcrVlModel) -> None:
    preps = [paddle_model.prepare("OCR:", [_img(150, 90, 8)]), paddle_model.prepare("Chart Recognition:", [])]
    params = SamplingParams(no_repeat_ngram_size=0)
    batch = generate_batch(paddle_model, preps, params, max_new_tokens=[5, 7])
    single = [generate(paddle_model, p, params, max_new_tokens=m) for p, m in zip(preps, [5, 7], strict=True)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]


def test_bfloat16_close_to_float32(paddle_ckpt, paddle_model: PaddleOcrVlModel) -> None:
    bf = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=torch.bfloat16)
    prepared = paddle_model.prepare("OCR:", [_img(150, 90, 9)])
    l32, _ = paddle_model.prefill(prepared, 2)
    l16, cache = bf.prefill(prepared, 2)
    assert l16.dtype == torch.float32 and torch.isfinite(l16).all()
    assert torch.corrcoef(torch.stack([l32, l16]))[0, 1] > 0.99
    tok = int(torch.argmax(l16))
    step = bf.decode([tok], [cache])
    assert step.shape == (1, bf.config.vocab_size) and torch.isfinite(step).all()
    bf.set_packed(not bf.packed_layers)  # the other storage of the linears: the same numbers
    _, cache2 = bf.prefill(prepared, 2)
    assert torch.equal(bf.decode([tok], [cache2]), step)


def test_float16_close_to_float32(paddle_ckpt, paddle_model: PaddleOcrVlModel) -> None:
    half = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=torch.float16)
    prepared = paddle_model.prepare("OCR:", [_img(150, 90, 10)])
    l32, _ = paddle_model.prefill(prepared, 2)
    l16, cache = half.prefill(prepared, 2)
    assert l16.dtype == torch.float32 and torch.isfinite(l16).all()
    assert torch.corrcoef(torch.stack([l32, l16]))[0, 1] > 0.999
    assert torch.isfinite(half.decode([int(torch.argmax(l16))], [cache])).all()
