"""PaddleOCR-VL 1.5 behind the :class:`~..base.OcrModel` protocol: PaddleOCR-VL's model with the 1.5
image preprocessing.

- Pixel budget: ``preprocessor_config.json``'s, as for v1; a checkpoint without one gets the 1.5 release's
  (112,896 - 1,003,520 pixels, i.e. 336^2 to 1280*28^2) instead of v1's.
- Text spotting (the prompt ``Spotting:``), as the model card preprocesses it: an image whose sides are
  both under 1500 px is first upscaled 2x (LANCZOS), and the budget's maximum becomes 2048*28^2 pixels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from PIL import Image

from ..paddleocr_vl.model import PaddleOcrVlModel, strip_image_markers
from ..paddleocr_vl.processor import (
    PROMPT_SPOTTING,
    ImageProcessorConfig,
    ProcessedImage,
    preprocess_image,
    to_rgb,
)

#: the 1.5 release's ``preprocessor_config.json`` budget
V15_IMAGE_CONFIG = ImageProcessorConfig(min_pixels=112_896, max_pixels=1_003_520)
#: spotting: images with both sides below this are upscaled 2x first
SPOTTING_UPSCALE_BELOW = 1500
SPOTTING_MAX_PIXELS = 2048 * 28 * 28


def spotting_image(image: Image.Image) -> Image.Image:
    """The image as spotting reads it: RGB, 2x LANCZOS when both sides are under 1500 px."""
    rgb = to_rgb(image)
    w, h = rgb.size
    if w < SPOTTING_UPSCALE_BELOW and h < SPOTTING_UPSCALE_BELOW:
        rgb = rgb.resize((w * 2, h * 2), Image.Resampling.LANCZOS)
    return rgb


class PaddleOcrVl15Model(PaddleOcrVlModel):
    kind: ClassVar[str] = "paddleocr-vl-1.5"
    image_defaults: ClassVar[ImageProcessorConfig] = V15_IMAGE_CONFIG

    def preprocess_images(self, text: str, images: list[Image.Image]) -> list[ProcessedImage]:
        if strip_image_markers(text, self.image_placeholder).strip() != PROMPT_SPOTTING:
            return super().preprocess_images(text, images)
        cfg = replace(self.image_config, max_pixels=SPOTTING_MAX_PIXELS)
        return [preprocess_image(spotting_image(img), cfg) for img in images]
