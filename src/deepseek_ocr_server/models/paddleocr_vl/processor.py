"""Image preprocessing and prompt construction for PaddleOCR-VL (SPEC §4 and §7).

Images: RGB (alpha composited on white) -> smart resize to multiples of 28 within the checkpoint's pixel
budget -> PIL bicubic -> (x/255 - 0.5)/0.5 -> 14x14 patches in raster order, grid (1, gh, gw).
Prompt: the checkpoint's ``chat_template.jinja`` (or the built-in variant B) renders one
``<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>`` per image, first in the user turn; each placeholder
is then expanded to ``gh*gw/4`` ids. No ``<s>`` BOS: the template starts with ``<|begin_of_sentence|>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image, ImageOps

from ..base import InputError
from .spec import (  # noqa: F401 - the task prompts, re-exported
    PROMPT_CHART,
    PROMPT_FORMULA,
    PROMPT_OCR,
    PROMPT_SEAL,
    PROMPT_SPOTTING,
    PROMPT_TABLE,
    TASK_PROMPTS,
)

IMAGE_PLACEHOLDER = "<|IMAGE_PLACEHOLDER|>"
IMAGE_START = "<|IMAGE_START|>"
IMAGE_END = "<|IMAGE_END|>"

#: Built-in chat template used when the checkpoint ships none ("variant B" of SPEC §7.2:
#: ``"Assistant:\n"`` and the image markup written out in the template).
FALLBACK_CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}\n"
    '{%- if not cls_token is defined -%}{%- set cls_token = "<|begin_of_sentence|>" -%}{%- endif -%}\n'
    '{%- if not eos_token is defined -%}{%- set eos_token = "</s>" -%}{%- endif -%}\n'
    "{{- cls_token -}}\n"
    "{%- for message in messages -%}\n"
    '{%- if message["role"] == "user" -%}\n'
    '{{- "User: " -}}\n'
    '{%- for content in message["content"] -%}{%- if content["type"] == "image" -%}'
    '{{ "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" }}{%- endif -%}{%- endfor -%}\n'
    '{%- for content in message["content"] -%}{%- if content["type"] == "text" -%}'
    '{{ content["text"] }}{%- endif -%}{%- endfor -%}\n'
    '{{ "\\n" -}}\n'
    '{%- elif message["role"] == "assistant" -%}\n'
    '{{- "Assistant:\\n" -}}\n'
    '{%- for content in message["content"] -%}{%- if content["type"] == "text" -%}'
    '{{ content["text"] }}{%- endif -%}{%- endfor -%}\n'
    "{{ eos_token -}}\n"
    '{%- elif message["role"] == "system" -%}\n'
    '{%- for content in message["content"] -%}{%- if content["type"] == "text" -%}'
    '{{ content["text"] + "\\n" }}{%- endif -%}{%- endfor -%}\n'
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    '{%- if add_generation_prompt -%}{{- "Assistant:\\n" -}}{%- endif -%}\n'
)


# --------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Values of ``preprocessor_config.json`` (defaults: PaddleOCR-VL v1.0, SPEC §4)."""

    min_pixels: int = 147384
    max_pixels: int = 2822400
    patch_size: int = 14
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL BICUBIC

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, base: ImageProcessorConfig | None = None) -> ImageProcessorConfig:
        """The file's values; a pixel budget the file does not give is ``base``'s (default: v1.0's)."""
        base = base or cls()
        if not d:
            return base
        size = d.get("size") or {}
        min_px = d.get("min_pixels", size.get("shortest_edge", base.min_pixels))
        max_px = d.get("max_pixels", size.get("longest_edge", base.max_pixels))
        return cls(
            min_pixels=int(min_px),
            max_pixels=int(max_px),
            patch_size=int(d.get("patch_size", 14)),
            merge_size=int(d.get("merge_size", 2)),
            image_mean=tuple(float(x) for x in d.get("image_mean", (0.5,) * 3)),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in d.get("image_std", (0.5,) * 3)),  # type: ignore[arg-type]
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            resample=int(d.get("resample", 3)),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with min_pixels <= h*w <= max_pixels (SPEC §4.2)."""
    if height < factor:
        width = round(width * factor / height)
        height = factor
    if width < factor:
        height = round(height * factor / width)
        width = factor
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"image aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB. EXIF orientation applied; alpha/transparency composited on WHITE (as
    transformers does); everything else (L, P, CMYK, YCbCr, ...) through PIL's own conversion.

    Deliberate difference from transformers (which lets PIL clip 16-bit values at 255, turning most
    16-bit scans white): 16/32-bit grey whose values exceed 255 is scaled from 0..65535 to 0..255;
    data that already lies in 0..255 is kept as is."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(image).astype(np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [gh*gw, 3, patch, patch] float32
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
    h2, w2 = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (w2, h2) != (width, height):
        rgb = rgb.resize((w2, h2), resample=Image.Resampling(cfg.resample))
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # [H, W, 3]
    # like transformers: rescale in float64, then float32 for the normalisation (bit-identical pixels)
    x = (arr.permute(2, 0, 1).to(torch.float64) * cfg.rescale_factor).to(torch.float32)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    p = cfg.patch_size
    gh, gw = h2 // p, w2 // p
    patches = x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p).contiguous()
    return ProcessedImage(patches, (1, gh, gw))


# --------------------------------------------------------------------------------------------- prompt


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def raise_exception(message: str) -> None:
        raise InputError(message)

    env.globals["raise_exception"] = raise_exception
    return env


def build_messages(text: str, num_images: int, system: str | None) -> list[dict[str, Any]]:
    """OpenAI-like typed-part messages: optional system turn, then one user turn, images first."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt(
    template: str, text: str, num_images: int, system: str | None, special: dict[str, str] | None = None
) -> str:
    """Render the chat template with ``add_generation_prompt`` on. ``special`` may bind ``cls_token`` /
    ``eos_token``; an ``image_token`` variable is deliberately never passed (SPEC §7.2)."""
    tmpl = _template_env().from_string(template)
    variables = {k: v for k, v in (special or {}).items() if k in ("cls_token", "eos_token")}
    return tmpl.render(
        messages=build_messages(text, num_images, system), add_generation_prompt=True, **variables
    )


def mrope_positions(
    input_ids: list[int], grids: list[tuple[int, int, int]], image_token_id: int, merge: int
) -> tuple[torch.Tensor, int]:
    """3-axis (t, h, w) positions of a prompt and its ``rope_delta`` (SPEC §8.2).

    Text tokens get (cur, cur, cur); an image run of merged grid (t, h', w') gets (cur, cur+r, cur+c) and
    then advances cur by max(h', w'). ``rope_delta = max position + 1 - len(input_ids)``.
    """
    n = len(input_ids)
    pos = torch.empty(3, n, dtype=torch.long)
    ids = torch.tensor(input_ids, dtype=torch.long)
    is_img = (ids == image_token_id).tolist()
    cur = 0
    i = 0
    k = 0
    while i < n:
        if not is_img[i]:
            j = i
            while j < n and not is_img[j]:
                j += 1
            pos[:, i:j] = torch.arange(cur, cur + j - i).unsqueeze(0)
            cur += j - i
            i = j
            continue
        if k >= len(grids):
            raise InputError("more image placeholder tokens than images")
        t, gh, gw = grids[k]
        k += 1
        hh, ww = gh // merge, gw // merge
        count = t * hh * ww
        if i + count > n or not all(is_img[i : i + count]):
            raise InputError("image placeholder tokens do not match the image sizes")
        tt = torch.zeros(t, hh, ww, dtype=torch.long)
        rr = torch.arange(hh).view(1, hh, 1).expand(t, hh, ww)
        cc = torch.arange(ww).view(1, 1, ww).expand(t, hh, ww)
        pos[0, i : i + count] = cur + tt.reshape(-1)
        pos[1, i : i + count] = cur + rr.reshape(-1)
        pos[2, i : i + count] = cur + cc.reshape(-1)
        cur += max(hh, ww)
        i += count
    if k != len(grids):
        raise InputError(f"{len(grids)} images but {k} image placeholders in the prompt")
    delta = int(pos.max().item()) + 1 - n if n else 0
    return pos, delta
