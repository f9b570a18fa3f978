"""DeepSeek-OCR 2 as a family of the server: the full-size module tree is the published key layout,
strict loading with one combined error, its registered defaults and prompts, bad input, batched decode,
int8, and the HTTP API end to end on the tiny checkpoint."""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import openai
import pytest
import torch
from fixtures.server import data_url, serve
from PIL import Image
from safetensors.torch import load_file

from deepseek_ocr_server import config as cfg
from deepseek_ocr_server.config import InferenceDefaults, ModelEntry, ServerSettings, Settings
from deepseek_ocr_server.engine.generate import generate
from deepseek_ocr_server.models import load_model, model_class
from deepseek_ocr_server.models.base import InputError, ModelFiles, ModelLoadError
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.models.deepseek_ocr2.config import DeepseekOcr2Config
from deepseek_ocr_server.models.deepseek_ocr2.model import DeepseekOcr2ForCausalLM, DeepseekOcr2Model
from deepseek_ocr_server.models.deepseek_ocr2.vision import hybrid_mask
from deepseek_ocr_server.models.quant import Int8Linear
from deepseek_ocr_server.sampling import SamplingParams
from deepseek_ocr_server.testing.deepseek_ocr import write_safetensors
from deepseek_ocr_server.testing.deepseek_ocr2 import WEIGHTS_NAME, full_config, original_shapes

#: sha256 of the published checkpoint's key list ("key<TAB>[shape]" lines, sorted, joined by "\n"):
#: the 2,707 tensors of deepseek-ai/DeepSeek-OCR-2's model.safetensors.index.json with their shapes
MANIFEST_SHA256 = "d797d34c6b312cc99ea8855ebe6f6e3a888a63ba09834ef258a6f6a8466e10eb"
DEFAULT = VisionSettings(base_size=1024, image_size=768, crop_mode=True)


def _digest(shapes: dict[str, tuple[int, ...]]) -> str:
    text = "\n".join(f"{k}\t{list(v)}" for k, v in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def page(w: int, h: int, seed: int = 0) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 238, 230))
    img.paste((30 + seed * 40, 30, 40), (w // 6, h // 8, w // 2, h // 4))
    img.paste((120, 20 + seed * 50, 200), (w // 3, h // 2, w - w // 4, h - h // 5))
    return img


def test_full_size_module_tree_is_the_published_layout():
    """Built on the meta device from the original config.json values (with its stale
    ``downsample_channels``), the model's parameters are exactly the 2,707 published keys and shapes."""
    net_cfg = DeepseekOcr2Config.from_dict(full_config())
    with torch.device("meta"):
        net = DeepseekOcr2ForCausalLM(net_cfg)
    shapes = {k: tuple(p.shape) for k, p in net.named_parameters()}
    assert not list(net.named_buffers())
    assert len(shapes) == 2707
    assert sum(math.prod(s) for s in shapes.values()) == 3_389_119_360
    assert _digest(shapes) == MANIFEST_SHA256
    assert shapes == original_shapes(full_config())  # the test builder writes the same layout
    assert shapes["model.sam_model.net_3.weight"] == (896, 512, 3, 3)


def test_hybrid_mask():
    """Image tokens see all image tokens and no query; queries see all image tokens and earlier queries."""
    n = 3
    m = hybrid_mask(n, torch.device("cpu"))
    for i in range(2 * n):
        for j in range(2 * n):
            assert bool(m[i, j]) == (j < n or (i >= n and j <= i)), (i, j)


def test_strict_loading_names_every_problem(deepseek2_ckpt: Path, tmp_path: Path):
    """A missing, an unexpected (v1's ``image_newline``) and a mis-shaped tensor: one error naming all three."""
    state = load_file(deepseek2_ckpt / WEIGHTS_NAME)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    del shapes["model.view_seperator"]
    shapes["model.image_newline"] = (64,)
    shapes["model.qwen2_model.query_768.weight"] = (100, 48)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bad / name).write_bytes((deepseek2_ckpt / name).read_bytes())
    write_safetensors(
        bad / WEIGHTS_NAME,
        shapes,
        lambda k, s: state[k] if k in state and tuple(state[k].shape) == s else torch.zeros(s),
        torch.float32,
    )
    with pytest.raises(ModelLoadError) as err:
        DeepseekOcr2Model.load(ModelFiles.from_dir(bad), dtype=torch.float32)
    msg = str(err.value)
    assert "DeepSeek-OCR 2 layout" in msg
    assert "missing tensors: model.view_seperator" in msg
    assert "unexpected tensors: model.image_newline" in msg
    assert "model.qwen2_model.query_768.weight (checkpoint [100, 48], expected [144, 48])" in msg


def test_registered_with_its_own_defaults(tmp_path: Path):
    assert model_class("deepseek-ocr-2") is DeepseekOcr2Model
    entry = cfg.builtin_models()["deepseek-ocr-2"]
    assert (entry.kind, entry.repo) == ("deepseek-ocr-2", "deepseek-ai/DeepSeek-OCR-2")
    for path in (tmp_path / "empty.toml", tmp_path / "new" / "config.toml"):  # no file / the written default
        if path.name == "empty.toml":
            path.write_text("", encoding="utf-8")
        s = cfg.load_settings({}, path)
        v2, v1 = s.inference_for("deepseek-ocr-2"), s.inference_for("deepseek-ocr")
        assert (v2.base_size, v2.image_size, v2.crop_mode, v2.no_repeat_ngram_size) == (1024, 768, True, 20)
        assert (v1.base_size, v1.image_size) == (1024, 640)
        assert s.default_prompt("deepseek-ocr-2") == "<image>\n<|grounding|>Convert the document to markdown."
    # [inference] and flags still override the kind's default
    p = tmp_path / "c.toml"
    p.write_text("[inference]\nimage_size = 1024\n", encoding="utf-8")
    assert cfg.load_settings({}, p).inference_for("deepseek-ocr-2").image_size == 1024
    assert (
        cfg.load_settings({"image_size": 1024}, tmp_path / "empty.toml")
        .inference_for("deepseek-ocr-2")
        .image_size
        == 1024
    )


def test_bad_requests(deepseek2_model):
    model = deepseek2_model
    for settings, name in (
        (VisionSettings(1024, 640, True), "image_size"),
        (VisionSettings(1280, 768, True), "base_size"),
    ):
        with pytest.raises(InputError, match=rf"{name} must be one of 768, 1024"):
            model.prepare("Free OCR.", [page(100, 100)], settings)
    with pytest.raises(InputError, match="at most one image"):
        model.prepare("Free OCR.", [page(100, 100), page(50, 50)], DEFAULT)
    # without crop mode base_size is not used (any value); only image_size's view exists
    one = model.prepare("<image>x", [page(900, 800)], VisionSettings(1280, 1024, False)).inputs["images"][0]
    assert (one.num_tokens, one.tiles) == (257, None)
    # other view sizes the encoder has queries for are served, each with its own token count
    assert (
        model.prepare("<image>x", [page(900, 800)], VisionSettings(768, 1024, True))
        .inputs["images"][0]
        .num_tokens
        == 145 + 4 * 256
    )


def test_batched_decode_equals_alone(deepseek2_model):
    """Two sequences of different lengths decoded in one step give the same logits as decoded alone."""
    model = deepseek2_model
    prepared = [
        model.prepare("Free OCR.", [page(700, 500)], DEFAULT),
        model.prepare("<image>\nParse the figure, with every detail.", [page(300, 200, 1)], DEFAULT),
    ]
    assert prepared[0].num_prompt_tokens != prepared[1].num_prompt_tokens
    alone = []
    for p in prepared:
        logits, cache = model.prefill(p, 8)
        steps = []
        tok = int(logits.argmax())
        for _ in range(4):
            logits = model.decode([tok], [cache])[0]
            steps.append(logits)
            tok = int(logits.argmax())
        alone.append(steps)
    caches, toks = [], []
    for p in prepared:
        logits, cache = model.prefill(p, 8)
        caches.append(cache)
        toks.append(int(logits.argmax()))
    for i in range(4):
        out = model.decode(toks, caches)
        for b in range(2):
            assert (out[b] - alone[b][i]).abs().max() <= 1e-4
        toks = [int(r.argmax()) for r in out]


def test_int8_keeps_the_vision_side(deepseek2_ckpt: Path):
    model = load_model(
        "deepseek-ocr-2", ModelFiles.from_dir(deepseek2_ckpt), dtype=torch.float32, quantize="int8"
    )
    m = model.net.model
    assert isinstance(m.layers[0].self_attn.q_proj, Int8Linear) and isinstance(model.net.lm_head, Int8Linear)
    assert not any(
        isinstance(x, Int8Linear)
        for part in (m.sam_model, m.qwen2_model, m.projector)
        for x in part.modules()
    )
    out = generate(model, model.prepare("Free OCR.", [page(200, 120)], DEFAULT), SamplingParams(), 5)
    assert out.completion_tokens == 5 or out.finish_reason == "stop"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_api_end_to_end(deepseek2_ckpt: Path, deepseek2_model, tmp_path: Path):
    """The server as configured (kind defaults: 1024 global view + 768-px tiles, its default prompt):
    chat (plain and streamed) and responses answers equal our engine's generate on the same model."""
    f = ModelFiles.from_dir(deepseek2_ckpt)
    settings = Settings(
        config_path=tmp_path / "config.toml",
        cache_dir=tmp_path / "cache",
        active="deepseek-ocr-2",
        models={
            "deepseek-ocr-2": ModelEntry(
                id="deepseek-ocr-2",
                kind="deepseek-ocr-2",
                config=f.config,
                tokenizer=f.tokenizer,
                weights=f.weights,
            )
        },
        inference=InferenceDefaults(device="cpu", dtype="f32", no_repeat_ngram_size=0),
        server=ServerSettings(max_running=2, max_queued=8, queue_timeout_s=300.0),
    )
    small, tiled = page(300, 200), page(1100, 700, 1)
    n = 6

    def expected(text: str, img: Image.Image) -> str:
        prepared = deepseek2_model.prepare(text, [img], DEFAULT)
        return generate(deepseek2_model, prepared, SamplingParams(no_repeat_ngram_size=0), n).text

    want_default = expected(settings.default_prompt("deepseek-ocr-2"), small)
    want_tiled = expected("Free OCR.", tiled)
    for srv in serve(settings):
        client = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=300)
        img_part = {"type": "image_url", "image_url": {"url": data_url(_png(small))}}
        r = client.chat.completions.create(
            model="deepseek-ocr-2", messages=[{"role": "user", "content": [img_part]}], max_tokens=n
        )
        assert r.choices[0].message.content == want_default
        assert (
            r.usage.prompt_tokens
            == deepseek2_model.prepare(
                settings.default_prompt("deepseek-ocr-2"), [small], DEFAULT
            ).num_prompt_tokens
        )
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Free OCR."},
                    {"type": "image_url", "image_url": {"url": data_url(_png(tiled))}},
                ],
            }
        ]
        chunks = list(
            client.chat.completions.create(model="deepseek-ocr-2", messages=msgs, max_tokens=n, stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_tiled
        resp = client.responses.create(
            model="deepseek-ocr-2",
            max_output_tokens=n,
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Free OCR."},
                        {"type": "input_image", "image_url": data_url(_png(tiled))},
                    ],
                }
            ],
        )
        assert resp.output_text == want_tiled
        bad = client.with_options(max_retries=0)
        with pytest.raises(openai.BadRequestError, match="at most one image"):
            bad.chat.completions.create(
                model="deepseek-ocr-2",
                max_tokens=n,
                messages=[{"role": "user", "content": [img_part, img_part]}],
            )
        assert srv.loads == ["deepseek-ocr-2"]


def test_documents_use_the_grounding_post_processor():
    """DeepSeek-OCR 2 writes v1's grounding format: the document pipeline cleans it the same way."""
    from deepseek_ocr_server.documents.postprocess import GROUNDING, for_kind

    assert for_kind("deepseek-ocr-2") is GROUNDING is for_kind("deepseek-ocr")
