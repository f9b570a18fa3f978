"""Tiny random PaddleOCR-VL 1.5 checkpoint: PaddleOCR-VL's tiny checkpoint (same keys, same layout) with
the 1.5 release's ``preprocessor_config.json`` pixel budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.paddleocr_vl15.model import V15_IMAGE_CONFIG
from .paddleocr_vl import build_tiny_checkpoint as build_v1


def build_tiny_checkpoint(directory: str | Path, **kwargs: Any) -> Path:
    d = build_v1(directory, **kwargs)
    path = d / "preprocessor_config.json"
    pre = json.loads(path.read_text(encoding="utf-8"))
    pre.update(min_pixels=V15_IMAGE_CONFIG.min_pixels, max_pixels=V15_IMAGE_CONFIG.max_pixels)
    path.write_text(json.dumps(pre, indent=2), encoding="utf-8")
    return d
