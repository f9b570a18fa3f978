"""PaddleOCR-VL 1.5: a built-in entry that reuses PaddleOCR-VL's model, with its own pixel budget,
prompts and spotting preprocessing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from fixtures.server import data_url, png_bytes
from PIL import Image

from deepseek_ocr_server import config
from deepseek_ocr_server.models import load_model
from deepseek_ocr_server.models.base import ModelFiles
from deepseek_ocr_server.models.paddleocr_vl.processor import smart_resize
from deepseek_ocr_server.models.paddleocr_vl15.model import PaddleOcrVl15Model, spotting_image
from deepseek_ocr_server.models.registry import family
from deepseek_ocr_server.server import build_app
from deepseek_ocr_server.testing.paddleocr_vl import build_tiny_checkpoint as build_v1

KIND = "paddleocr-vl-1.5"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return family(KIND).build_test_checkpoint(tmp_path_factory.mktemp("paddle15"))


@pytest.fixture(scope="module")
def model(ckpt: Path) -> PaddleOcrVl15Model:
    m = load_model(KIND, ModelFiles.from_dir(ckpt), dtype=torch.float32)
    assert isinstance(m, PaddleOcrVl15Model)
    return m


def test_builtin_entry_prompts_and_defaults(tmp_path: Path) -> None:
    s = config.load_settings({}, tmp_path / "new" / "config.toml")
    e = s.models[KIND]
    assert (e.kind, e.repo) == (KIND, "PaddlePaddle/PaddleOCR-VL-1.5")
    assert s.default_prompt(KIND) == "OCR:"
    assert s.inference_for(KIND).no_repeat_ngram_size == 0  # greedy without an n-gram ban, as v1
    spec = family(KIND)
    assert set(spec.prompts) == {
        "OCR:",
        "Table Recognition:",
        "Formula Recognition:",
        "Chart Recognition:",
        "Seal Recognition:",
        "Spotting:",
    }
    assert spec.quantize_skip == family("paddleocr-vl").quantize_skip and spec.postprocess == "otsl"


def test_tiny_checkpoint_loads_strictly_with_v1_keys(model: PaddleOcrVl15Model, tmp_path: Path) -> None:
    v1 = load_model("paddleocr-vl", ModelFiles.from_dir(build_v1(tmp_path / "v1")), dtype=torch.float32)
    assert set(model.net.state_dict()) == set(v1.net.state_dict())  # the same layout, strictly loaded
    assert (model.image_config.min_pixels, model.image_config.max_pixels) == (112_896, 1_003_520)


def test_pixel_budget_without_preprocessor_config(ckpt: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "preprocessor_config.json").unlink()
    m = load_model(KIND, ModelFiles.from_dir(bare), dtype=torch.float32)
    assert (m.image_config.min_pixels, m.image_config.max_pixels) == (112_896, 1_003_520)  # the 1.5 release's
    v1 = load_model("paddleocr-vl", ModelFiles.from_dir(bare), dtype=torch.float32)
    assert (v1.image_config.min_pixels, v1.image_config.max_pixels) == (147_384, 2_822_400)


def test_spotting_upscales_small_images_with_lanczos() -> None:
    small = Image.effect_noise((300, 200), 40).convert("RGB")
    up = spotting_image(small)
    assert up.size == (600, 400)
    assert up.tobytes() == small.resize((600, 400), Image.Resampling.LANCZOS).tobytes()
    for size in ((1500, 200), (200, 1600)):  # one side at or above 1500 px: unchanged
        assert spotting_image(Image.new("RGB", size)).size == size


def _grid_pixels(model: PaddleOcrVl15Model, prompt: str, size: tuple[int, int]) -> tuple[int, int]:
    (processed,) = model.preprocess_images(prompt, [Image.new("RGB", size, (255, 255, 255))])
    _, gh, gw = processed.grid_thw
    return gh * 14, gw * 14


def test_spotting_budget_and_upscale_in_prepare(model: PaddleOcrVl15Model) -> None:
    w, h = 1400, 1000
    # OCR: the checkpoint's budget on the image as it is
    ocr = _grid_pixels(model, "OCR:", (w, h))
    assert ocr == smart_resize(h, w, 28, 112_896, 1_003_520)
    # Spotting: 2x upscale (both sides < 1500), then 2048*28*28 pixels at most
    spot = _grid_pixels(model, "<image>\nSpotting:", (w, h))
    assert spot == smart_resize(2 * h, 2 * w, 28, 112_896, 2048 * 28 * 28)
    assert spot[0] * spot[1] > 1_003_520 >= ocr[0] * ocr[1]
    # a large image is not upscaled, only the budget grows
    assert _grid_pixels(model, "Spotting:", (1600, 1200)) == smart_resize(
        1200, 1600, 28, 112_896, 2048 * 28 * 28
    )
    prepared = model.prepare("Spotting:", [Image.new("RGB", (64, 48))])
    assert prepared.inputs["grids"] == [
        (1, *(s // 14 for s in smart_resize(96, 128, 28, 112_896, 1_605_632)))
    ]


def test_served_by_its_id(ckpt: Path, tmp_path: Path) -> None:
    files = ModelFiles.from_dir(ckpt)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[models]\nactive = "{KIND}"\n[models.entries."{KIND}"]\nconfig = "{files.config}"\n'
        f'tokenizer = "{files.tokenizer}"\nweights = "{files.weights}"\n',
        encoding="utf-8",
    )
    app, manager = build_app(config.load_settings({"cache_dir": tmp_path / "cache", "dtype": "f32"}, path))
    with TestClient(app) as client:
        assert KIND in [m["id"] for m in client.get("/v1/models").json()["data"]]
        image = {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}
        text = {"type": "text", "text": "Spotting:"}
        body = {"model": KIND, "max_tokens": 4, "messages": [{"role": "user", "content": [image, text]}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        assert manager.status().model_id == KIND
