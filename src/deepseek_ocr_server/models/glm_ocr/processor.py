"""Image preprocessing and prompt construction for GLM-OCR.

Images: RGB (alpha composited on white) -> smart resize to multiples of 28 within the pixel budget of
``preprocessor_config.json`` (counted over the 2 temporal frames of a still image) -> PIL bicubic ->
(x/255 - mean)/std with the OpenAI-CLIP mean/std -> 14x14 patches in 2x2-window order, each patch
repeated over the 2 frames: rows of ``channels*2*14*14`` values, grid (1, gh, gw).
Prompt: the checkpoint's ``chat_template.jinja`` renders the user turn's parts in content order (an
image becomes ``<|begin_of_image|><|image|><|end_of_image|>``); each ``<|image|>`` is then expanded to
``gh*gw/4`` ids. The template starts with ``[gMASK]<sop>``; no BOS is added.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..base import InputError
from ..paddleocr_vl.processor import _template_env, to_rgb
from .spec import PROMPT_FORMULA, PROMPT_TABLE, PROMPT_TEXT, TASK_PROMPTS  # noqa: F401 - the model card's task prompts

IMAGE_TOKEN = "<|image|>"

#: Used when the checkpoint ships no template: the user/assistant subset of the original one.
FALLBACK_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{ '<|system|>\\n' }}"
    "{%- for item in m.content -%}{%- if item.type == 'text' -%}{{ item.text }}{%- endif -%}{%- endfor -%}"
    "{%- elif m.role == 'user' -%}{{ '<|user|>\\n' }}"
    "{%- for item in m.content -%}"
    "{%- if item.type == 'image' -%}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Values of ``preprocessor_config.json`` (defaults: the released GLM-OCR file)."""

    min_pixels: int = 12544
    max_pixels: int = 9633792
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL BICUBIC

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ImageProcessorConfig:
        if not d:
            return cls()
        size = d.get("size") or {}
        return cls(
            min_pixels=int(d.get("min_pixels", size.get("shortest_edge", cls.min_pixels))),
            max_pixels=int(d.get("max_pixels", size.get("longest_edge", cls.max_pixels))),
            patch_size=int(d.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(d.get("merge_size", cls.merge_size)),
            image_mean=tuple(float(x) for x in d.get("image_mean", cls.image_mean)),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in d.get("image_std", cls.image_std)),  # type: ignore[arg-type]
            rescale_factor=float(d.get("rescale_factor", cls.rescale_factor)),
            resample=int(d.get("resample", cls.resample)),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 2
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``; ``frames*h*w`` kept within [min_pixels, max_pixels].
    Images smaller than ``factor`` on a side are first scaled up (truncating to whole pixels)."""
    if height < factor or width < factor:
        s = max(factor / height, factor / width)
        height, width = int(height * s), int(width * s)
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"image aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [gh*gw, C*T*P*P] float32, 2x2-window order
    grid_thw: tuple[int, int, int]  # (1, gh, gw)

    @property
    def num_tokens(self) -> int:
        """Image tokens in the prompt (after the 2x2 merge)."""
        t, h, w = self.grid_thw
        return t * h * w // 4


def preprocess_image(image: Image.Image, cfg: ImageProcessorConfig) -> ProcessedImage:
    rgb = to_rgb(image)
    width, height = rgb.size
    if width < 1 or height < 1:
        raise InputError("empty image")
    h2, w2 = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels, cfg.temporal_patch_size)
    if (w2, h2) != (width, height):
        rgb = rgb.resize((w2, h2), resample=Image.Resampling(cfg.resample))
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # [H, W, 3]
    x = (arr.permute(2, 0, 1).to(torch.float64) * cfg.rescale_factor).to(torch.float32)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h2 // p, w2 // p
    # (C, H, W) -> (gh/m, gw/m, m, m, C, p, p): window-major patches, each (channel, y, x)
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)  # the still image repeated over the frames
    return ProcessedImage(x.reshape(gh * gw, 3 * t * p * p).contiguous(), (1, gh, gw))


# --------------------------------------------------------------------------------------------- prompt


def build_messages(text: str, num_images: int, system: str | None, marker: str) -> list[dict[str, Any]]:
    """One user turn whose parts follow the text: each ``marker`` in ``text`` becomes the next image;
    images without a marker come first (the model card's order: image, then the task prompt).
    A newline right after a marker is part of the marker (``"<image>\\nText Recognition:"``)."""
    pieces = re.split(re.escape(marker) + r"\r?\n?", text)
    marked = len(pieces) - 1
    if marked > num_images:
        raise InputError(f"the prompt has {marked} {marker} markers for {num_images} images")
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images - marked)]
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt(template: str, messages: list[dict[str, Any]]) -> str:
    """The chat template with ``add_generation_prompt`` on (no ``enable_thinking``: the model card's form)."""
    try:
        return _template_env().from_string(template).render(messages=messages, add_generation_prompt=True)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a template error is the checkpoint's, but the request fails
        raise InputError(f"cannot render the chat template: {e}") from e
