"""Model families. Each kind maps to the class implementing :class:`~.base.OcrModel`.

Imports are lazy so that listing kinds never imports torch-heavy modules.
"""

from __future__ import annotations

import importlib

from .base import ModelFiles, OcrModel

MODEL_KINDS: dict[str, str] = {
    "deepseek-ocr": "deepseek_ocr_server.models.deepseek_ocr.model:DeepseekOcrModel",
    "deepseek-ocr-2": "deepseek_ocr_server.models.deepseek_ocr2.model:DeepseekOcr2Model",
    "paddleocr-vl": "deepseek_ocr_server.models.paddleocr_vl.model:PaddleOcrVlModel",
    # deterministic test model (testing/fake.py): lets the server run without real weights
    "fake": "deepseek_ocr_server.testing.fake:FakeOcrModel",
}


def model_class(kind: str) -> type[OcrModel]:
    try:
        target = MODEL_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def load_model(kind: str, files: ModelFiles, **kwargs: object) -> OcrModel:
    return model_class(kind).load(files, **kwargs)  # type: ignore[arg-type]
