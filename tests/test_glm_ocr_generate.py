"""GLM-OCR cached and batched decoding, and the whole server (engine + OpenAI API) on the tiny checkpoint."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from fixtures.server import RunningServer, data_url, png_bytes, serve
from PIL import Image

from deepseek_ocr_server.config import (
    InferenceDefaults,
    ModelEntry,
    ServerSettings,
    Settings,
    load_settings,
)
from deepseek_ocr_server.engine.generate import generate
from deepseek_ocr_server.models.base import ModelFiles, Prepared
from deepseek_ocr_server.models.glm_ocr.language import GlmKVCache
from deepseek_ocr_server.models.glm_ocr.model import GlmOcrModel
from deepseek_ocr_server.models.paddleocr_vl.processor import mrope_positions
from deepseek_ocr_server.models.registry import family
from deepseek_ocr_server.sampling import SamplingParams


def _img(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _greedy(model: GlmOcrModel, prepared: Prepared, n: int) -> tuple[list[int], list[torch.Tensor]]:
    logits, cache = model.prefill(prepared, n)
    toks, all_logits = [], [logits]
    for _ in range(n):
        toks.append(int(torch.argmax(logits)))
        logits = model.decode([toks[-1]], [cache])[0]
        all_logits.append(logits)
    return toks, all_logits


def test_cached_decode_equals_recompute(glm_model: GlmOcrModel) -> None:
    prepared = glm_model.prepare("Text Recognition:", [_img(150, 90, 0)])
    toks, logits = _greedy(glm_model, prepared, 8)
    ids = prepared.input_ids + toks
    pos, delta = mrope_positions(ids, prepared.inputs["grids"], glm_model.config.image_token_id, 2)
    recomputed, cache = glm_model.prefill(
        Prepared(ids, dict(prepared.inputs, positions=pos, rope_delta=delta)), 1
    )
    torch.testing.assert_close(logits[-1], recomputed, atol=1e-4, rtol=0)
    assert cache.length == len(ids)


def test_batch_of_two_equals_each_alone_and_cache_grows(glm_model: GlmOcrModel, monkeypatch) -> None:
    import deepseek_ocr_server.models.glm_ocr.model as mod

    a = glm_model.prepare("Text Recognition:", [_img(150, 90, 1)])
    b = glm_model.prepare("Table Recognition:", [_img(90, 300, 2), _img(60, 60, 3)], system="sys")
    assert len(a.input_ids) != len(b.input_ids)
    steps = 8
    alone = [_greedy(glm_model, p, steps) for p in (a, b)]
    monkeypatch.setattr(mod, "_INITIAL_DECODE_RESERVE", 1)  # every cache regrows during the run
    la, ca = glm_model.prefill(a, steps)
    lb, cb = glm_model.prefill(b, steps)
    assert isinstance(ca, GlmKVCache) and ca.capacity == len(a.input_ids) + 1
    ta, tb = int(torch.argmax(la)), int(torch.argmax(lb))
    for step in range(steps):
        assert [ta, tb] == [alone[0][0][step], alone[1][0][step]]
        out = glm_model.decode([ta, tb], [ca, cb])
        assert out.shape == (2, glm_model.config.vocab_size) and out.dtype == torch.float32
        torch.testing.assert_close(out[0], alone[0][1][step + 1], atol=5e-5, rtol=0)
        torch.testing.assert_close(out[1], alone[1][1][step + 1], atol=5e-5, rtol=0)
        ta, tb = int(torch.argmax(out[0])), int(torch.argmax(out[1]))
    assert ca.length == len(a.input_ids) + steps and cb.length == len(b.input_ids) + steps
    ca.release()
    with pytest.raises(RuntimeError):
        glm_model.decode([1], [ca])


def test_builtin_entry_and_kind_defaults(tmp_path: Path) -> None:
    s = load_settings({}, tmp_path / "new" / "config.toml")  # the default file written on first start
    e = s.models["glm-ocr"]
    assert (e.kind, e.repo) == ("glm-ocr", "zai-org/GLM-OCR")
    inf = s.inference_for("glm-ocr")
    assert (inf.max_new_tokens, inf.no_repeat_ngram_size, inf.do_sample) == (8192, 0, False)
    assert s.inference_for("deepseek-ocr").max_new_tokens == 512
    assert s.default_prompt("glm-ocr") == family("glm-ocr").default_prompt == "Text Recognition:"


# --- engine + API end to end -------------------------------------------------------------------------

PNG = png_bytes((30, 60, 90), (60, 40))
MAX_NEW = 8


@pytest.fixture(scope="module")
def glm_server(glm_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("glm-server")
    f = ModelFiles.from_dir(glm_ckpt)
    entry = ModelEntry(
        id="glm-ocr", kind="glm-ocr", config=f.config, tokenizer=f.tokenizer, weights=f.weights
    )
    settings = Settings(
        config_path=root / "config.toml",
        cache_dir=root / "cache",
        active="glm-ocr",
        models={"glm-ocr": entry},
        inference=InferenceDefaults(device="cpu", dtype="f32"),
        server=ServerSettings(max_running=2, max_queued=16, queue_timeout_s=300.0),
    )
    yield from serve(settings)


def test_server_answers_like_the_model(glm_server: RunningServer, glm_model: GlmOcrModel) -> None:
    img = Image.open(io.BytesIO(PNG)).convert("RGB")
    greedy = SamplingParams(no_repeat_ngram_size=0)
    default = generate(glm_model, glm_model.prepare("Text Recognition:", [img]), greedy, MAX_NEW)
    table = generate(glm_model, glm_model.prepare("Table Recognition:", [img]), greedy, MAX_NEW)
    client = openai.OpenAI(base_url=glm_server.v1, api_key="x", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["glm-ocr"]
    image_part = {"type": "image_url", "image_url": {"url": data_url(PNG)}}
    # no text: the kind's default task prompt
    r = client.chat.completions.create(
        model="glm-ocr", messages=[{"role": "user", "content": [image_part]}], max_tokens=MAX_NEW
    )
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (default.text, default.finish_reason)
    assert r.usage.prompt_tokens == len(glm_model.prepare("Text Recognition:", [img]).input_ids)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Table Recognition:"}, image_part]}]
    chunks = list(
        client.chat.completions.create(model="glm-ocr", messages=msgs, max_tokens=MAX_NEW, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == table.text
    # a prompt the model cannot serve is a 400, and the server keeps serving
    bad = [{"role": "user", "content": [{"type": "text", "text": "<|image|>"}, image_part]}]
    resp = httpx.post(
        f"{glm_server.v1}/chat/completions",
        json={"model": "glm-ocr", "messages": bad, "max_tokens": 2},
        timeout=300,
    )
    assert resp.status_code == 400 and "placeholder" in resp.json()["error"]["message"]
    again = client.chat.completions.create(model="glm-ocr", messages=msgs, max_tokens=MAX_NEW)
    assert again.choices[0].message.content == table.text
