"""PaddleOCR-VL 1.5's facts for the registry (light: no torch import)."""

from ..paddleocr_vl.spec import SPEC as V1
from ..paddleocr_vl.spec import TASK_PROMPTS
from ..registry import FamilySpec

SPEC = FamilySpec(
    kind="paddleocr-vl-1.5",
    title="PaddleOCR-VL 1.5",
    model="deepseek_ocr_server.models.paddleocr_vl15.model:PaddleOcrVl15Model",
    repo="PaddlePaddle/PaddleOCR-VL-1.5",
    default_prompt=V1.default_prompt,
    prompts=tuple(TASK_PROMPTS.values()),  # v1's four + "Seal Recognition:" and "Spotting:"
    defaults=V1.defaults,
    options=V1.options,
    quantize_skip=V1.quantize_skip,
    postprocess=V1.postprocess,
    test_checkpoint="deepseek_ocr_server.testing.paddleocr_vl15:build_tiny_checkpoint",
    config_comments=('{prompt}   # or "Table Recognition:", "Seal Recognition:", "Spotting:", ...',),
)
