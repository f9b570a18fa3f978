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
    "glm-ocr": "deepseek_ocr_server.models.glm_ocr.model:GlmOcrModel",
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
    """``cls.load(files, device=, dtype=, quantize=)``. ``dtype`` None means auto: a family that takes a
    per-phase plan (``precision_plans = True``: its load calls ``check_load_options`` for the plan and
    ``layers.storage_dtypes`` / ``layers.prepare_for_inference``) gets it; any other family gets the
    plan's compute dtype for everything."""
    cls = model_class(kind)
    if kwargs.get("dtype") is None and not getattr(cls, "precision_plans", False):
        from .precision import resolve_precision

        kwargs["dtype"] = resolve_precision(None, kwargs.get("device", "cpu")).compute_dtype
    return cls.load(files, **kwargs)  # type: ignore[arg-type]
