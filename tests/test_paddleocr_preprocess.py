"""PaddleOCR-VL preprocessing and prompt construction, pinned against transformers' processor."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepseek_ocr_server.models.base import InputError, ModelFiles
from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel
from deepseek_ocr_server.models.paddleocr_vl.processor import (
    FALLBACK_CHAT_TEMPLATE,
    PROMPT_CHART,
    PROMPT_FORMULA,
    PROMPT_OCR,
    PROMPT_TABLE,
    ImageProcessorConfig,
    mrope_positions,
    preprocess_image,
    render_prompt,
    smart_resize,
    to_rgb,
)
from deepseek_ocr_server.testing.paddleocr_vl import CHAT_TEMPLATE_B

RNG = np.random.default_rng(1234)


def _rgb(w: int, h: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference(processor, image: Image.Image) -> tuple[torch.Tensor, list[int]]:
    out = processor.image_processor(images=[image], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"][0].tolist()


# (width, height): ordinary, below min_pixels, tiny, extreme aspect ratios both ways, above max_pixels
SIZES = [(150, 90), (20, 12), (28, 28), (300, 10), (30, 2000), (9000, 50), (1000, 1400), (333, 777)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pixels_equal_transformers(paddle_model: PaddleOcrVlModel, paddle_hf, size: tuple[int, int]) -> None:
    img = _rgb(*size)
    ref_pixels, ref_grid = _reference(paddle_hf[1], img)
    ours = preprocess_image(img, paddle_model.image_config)
    assert list(ours.grid_thw) == ref_grid
    assert ours.pixel_values.shape == ref_pixels.shape
    assert torch.equal(ours.pixel_values, ref_pixels)


def _mode_images() -> dict[str, Image.Image]:
    base = _rgb(120, 80)
    alpha = Image.fromarray(RNG.integers(0, 256, (80, 120), dtype=np.uint8))
    rgba = base.copy()
    rgba.putalpha(alpha)
    la = base.convert("L")
    la.putalpha(alpha)
    p = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 3
    return {
        "RGBA": rgba,
        "LA": la,
        "P": p,
        "P+transparency": p_transparent,
        "L": base.convert("L"),
        "CMYK": base.convert("CMYK"),
        "1": base.convert("1"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_modes_equal_transformers(paddle_model: PaddleOcrVlModel, paddle_hf, mode: str) -> None:
    img = _mode_images()[mode]
    ref_pixels, ref_grid = _reference(paddle_hf[1], img)
    ours = preprocess_image(img, paddle_model.image_config)
    assert list(ours.grid_thw) == ref_grid
    assert torch.equal(ours.pixel_values, ref_pixels)


def test_alpha_composited_on_white_and_16bit_scaled() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    grey16 = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # 128 * 257
    assert grey16.mode.startswith("I")
    assert np.asarray(to_rgb(grey16)).tolist() == np.full((4, 4, 3), 128).tolist()


def test_16bit_data_already_in_8bit_range_kept() -> None:
    grey16 = Image.fromarray(np.full((4, 4), 200, dtype=np.uint16))
    assert grey16.mode == "I;16"
    assert np.asarray(to_rgb(grey16)).tolist() == np.full((4, 4, 3), 200).tolist()


def test_exif_orientation_applied() -> None:
    img = _rgb(30, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.info["exif"] = exif.tobytes()
    img.getexif()[0x0112] = 6
    assert to_rgb(img).size == (10, 30)


@pytest.mark.parametrize(
    ("wh", "grid"),
    [
        ((150, 90), (22, 36)),
        ((300, 10), (6, 152)),
        ((28, 28), (28, 28)),
        ((768, 1024), (74, 54)),
        ((4000, 3000), (102, 138)),
        ((9000, 50), (4, 642)),
    ],
)
def test_smart_resize_real_budget(wh: tuple[int, int], grid: tuple[int, int]) -> None:
    cfg = ImageProcessorConfig()  # v1.0 defaults: 147384 .. 2822400 pixels
    h, w = smart_resize(wh[1], wh[0], 28, cfg.min_pixels, cfg.max_pixels)
    assert (h // 14, w // 14) == grid


def test_extreme_aspect_ratio_rejected(paddle_model: PaddleOcrVlModel) -> None:
    with pytest.raises(InputError, match="aspect ratio"):
        paddle_model.prepare(PROMPT_OCR, [_rgb(6000, 20)])


def test_prompt_string_pinned(paddle_model: PaddleOcrVlModel) -> None:
    assert paddle_model.render("OCR:", 1) == (
        "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant:\n"
    )
    assert paddle_model.render("<image>\nOCR:", 1, system="Be exact.") == (
        "<|begin_of_sentence|>Be exact.\nUser: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant:\n"
    )
    assert paddle_model.render("  <image>\r\nOCR:", 1) == paddle_model.render("OCR:", 1)
    two = paddle_model.render("a<image>b<image>", 2)
    assert two == (
        "<|begin_of_sentence|>User: "
        + "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" * 2
        + "ab\nAssistant:\n"
    )
    assert (PROMPT_OCR, PROMPT_TABLE, PROMPT_FORMULA, PROMPT_CHART) == (
        "OCR:",
        "Table Recognition:",
        "Formula Recognition:",
        "Chart Recognition:",
    )


# A template in the style of the older "variant A" (the first checkpoint revision's template): "Assistant: " with a trailing space and
# the image markup taken from an ``image_token`` variable with a default. We never bind that variable,
# so START/END survive (transformers would bind it to the bare placeholder and drop them).
VARIANT_A_STYLE = (
    "{%- if not image_token is defined -%}"
    '{%- set image_token = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" -%}{%- endif -%}'
    '{{- "<|begin_of_sentence|>" -}}'
    "{%- for message in messages -%}"
    '{%- if message["role"] == "user" -%}{{- "User: " -}}'
    '{%- for c in message["content"] -%}{%- if c["type"] == "image" -%}{{ image_token }}{%- endif -%}{%- endfor -%}'
    '{%- for c in message["content"] -%}{%- if c["type"] == "text" -%}{{ c["text"] }}{%- endif -%}{%- endfor -%}'
    '{{ "\\n" -}}{%- endif -%}'
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{- "Assistant: " -}}{%- endif -%}'
)


def test_variant_a_style_template_keeps_image_markup(paddle_ckpt: Path, tmp_path: Path) -> None:
    shutil.copytree(paddle_ckpt, tmp_path / "c")
    (tmp_path / "c" / "chat_template.jinja").write_text(VARIANT_A_STYLE)
    m = PaddleOcrVlModel.load(ModelFiles.from_dir(tmp_path / "c"), dtype=torch.float32)
    assert m.render("OCR:", 1) == (
        "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant: "
    )
    prepared = m.prepare("OCR:", [_rgb(150, 90)])
    ids = prepared.input_ids
    assert ids.count(m.config.vision_start_token_id) == 1 and ids.count(m.config.vision_end_token_id) == 1


def test_fallback_template_equals_shipped_variant_b() -> None:
    for n, system in ((0, None), (1, None), (2, "sys")):
        assert render_prompt(FALLBACK_CHAT_TEMPLATE, "OCR:", n, system) == render_prompt(
            CHAT_TEMPLATE_B, "OCR:", n, system
        )


def test_without_template_file_uses_fallback(paddle_ckpt: Path, tmp_path: Path) -> None:
    shutil.copytree(paddle_ckpt, tmp_path / "c")
    (tmp_path / "c" / "chat_template.jinja").unlink()
    m = PaddleOcrVlModel.load(ModelFiles.from_dir(tmp_path / "c"), dtype=torch.float32)
    assert m.chat_template == FALLBACK_CHAT_TEMPLATE
    assert m.render("OCR:", 1).endswith("OCR:\nAssistant:\n")


def test_prepare_ids_equal_transformers(paddle_model: PaddleOcrVlModel, paddle_hf) -> None:
    proc = paddle_hf[1]
    imgs = [_rgb(150, 90), _rgb(800, 390)]
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": imgs[0]},
                {"type": "image", "image": imgs[1]},
                {"type": "text", "text": "Table Recognition:"},
            ],
        }
    ]
    ref = proc.apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    ours = paddle_model.prepare("Table Recognition:", imgs)
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert ours.input_ids[0] != 1  # no <s>
    assert torch.equal(ours.inputs["pixel_values"], ref["pixel_values"])
    assert [list(g) for g in ours.inputs["grids"]] == ref["image_grid_thw"].tolist()


def test_placeholder_in_user_text_rejected(paddle_model: PaddleOcrVlModel) -> None:
    with pytest.raises(InputError, match="placeholder"):
        paddle_model.prepare("<|IMAGE_PLACEHOLDER|> OCR:", [_rgb(100, 100)])


def test_prompt_longer_than_context_rejected(paddle_model: PaddleOcrVlModel) -> None:
    with pytest.raises(InputError, match="context"):
        paddle_model.prepare("a" * (paddle_model.max_context + 10), [])


def test_mrope_positions_worked_example() -> None:
    # 3-D positions: 5 text tokens, a 6x10 grid (3x5 merged, 15 tokens), then text
    img = 99
    ids = [1, 2, 3, 4, 5] + [img] * 15 + [6, 7]
    pos, delta = mrope_positions(ids, [(1, 6, 10)], img, 2)
    assert pos[:, :5].tolist() == [list(range(5))] * 3
    assert pos[0, 5:20].tolist() == [5] * 15
    assert pos[1, 5:20].tolist() == [5] * 5 + [6] * 5 + [7] * 5
    assert pos[2, 5:20].tolist() == [5, 6, 7, 8, 9] * 3
    assert pos[:, 20].tolist() == [10, 10, 10]
    assert pos[:, 21].tolist() == [11, 11, 11]
    assert delta == 12 - len(ids) == 5 - 15
