"""GLM-OCR image preprocessing and prompt construction against transformers' Glm46V processor code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.glm46v.image_processing_pil_glm46v import smart_resize as hf_smart_resize

from deepseek_ocr_server.models.base import InputError
from deepseek_ocr_server.models.glm_ocr.model import GlmOcrModel
from deepseek_ocr_server.models.glm_ocr.processor import ImageProcessorConfig, smart_resize
from deepseek_ocr_server.models.glm_ocr.vision import window_positions

CFG = ImageProcessorConfig()

# (W, H) -> image tokens with the released pixel budget
KNOWN = {(150, 90): 15, (100, 100): 16, (50, 20): 10, (595, 842): 630, (2480, 3508): 6045, (6000, 4000): 6144}


@pytest.mark.parametrize(
    "wh",
    [*KNOWN, (1240, 1754), (1920, 1080), (4000, 3000), (3000, 3000), (9000, 50), (27, 27), (13, 400), (1, 1)],
)
def test_smart_resize_equals_transformers(wh: tuple[int, int]) -> None:
    w, h = wh
    ours = smart_resize(h, w, CFG.factor, CFG.min_pixels, CFG.max_pixels)
    ref = hf_smart_resize(2, h, w, 2, CFG.factor, CFG.min_pixels, CFG.max_pixels)
    assert ours == ref
    if wh in KNOWN:
        assert (ours[0] // 28) * (ours[1] // 28) == KNOWN[wh]


def test_extreme_aspect_ratio_is_an_input_error() -> None:
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(28, 28 * 201, CFG.factor, CFG.min_pixels, CFG.max_pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_pixel_rows_equal_transformers(glm_model: GlmOcrModel, glm_hf, mode: str) -> None:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (70, 130, 4), dtype=np.uint8), "RGBA").convert(mode)
    prepared = glm_model.prepare("Text Recognition:", [img])
    ref = glm_hf[2]([img], return_tensors="pt")
    assert torch.equal(prepared.inputs["pixel_values"], ref["pixel_values"])
    assert prepared.inputs["grids"] == [tuple(ref["image_grid_thw"][0].tolist())]


def test_window_positions_follow_the_patch_order() -> None:
    row, col = window_positions([(1, 4, 6)], 2)
    assert list(zip(row.tolist()[:6], col.tolist()[:6], strict=True)) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (0, 2),
        (0, 3),
    ]
    assert sorted(zip(row.tolist(), col.tolist(), strict=True)) == [
        (r, c) for r in range(4) for c in range(6)
    ]


def test_image_markers_place_images_in_content_order(glm_model: GlmOcrModel) -> None:
    bi = "<|begin_of_image|><|image|><|end_of_image|>"
    assert (
        glm_model.render("Text Recognition:", 1)
        == f"[gMASK]<sop><|user|>\n{bi}Text Recognition:<|assistant|>\n"
    )
    assert glm_model.render("<image>\nText Recognition:", 1) == glm_model.render("Text Recognition:", 1)
    assert (
        glm_model.render("a<image>b", 2, system="S")
        == f"[gMASK]<sop><|system|>\nS<|user|>\n{bi}a{bi}b<|assistant|>\n"
    )
    with pytest.raises(InputError, match="markers"):
        glm_model.prepare("<image><image>", [Image.new("RGB", (40, 40))])
    with pytest.raises(InputError, match="placeholders"):
        glm_model.prepare("read <|image|>", [])
