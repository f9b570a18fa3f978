"""DeepSeek-OCR 2's facts for the registry (light: no torch import)."""

from ..deepseek_ocr.spec import DOCUMENT_PROMPT
from ..registry import FamilySpec

SPEC = FamilySpec(
    kind="deepseek-ocr-2",
    title="DeepSeek-OCR 2",
    model="deepseek_ocr_server.models.deepseek_ocr2.model:DeepseekOcr2Model",
    repo="deepseek-ai/DeepSeek-OCR-2",
    default_prompt=DOCUMENT_PROMPT,
    prompts=(DOCUMENT_PROMPT,),
    # its encoder has learned queries for 768- and 1024-px views only: tiles are 768 px
    defaults={"image_size": 768},
    options=("base_size", "image_size", "crop_mode"),
    quantize_skip=frozenset({"sam_model", "qwen2_model", "projector"}),
    postprocess="grounding",  # the same grounding format as DeepSeek-OCR
    test_checkpoint="deepseek_ocr_server.testing.deepseek_ocr2:build_tiny_checkpoint",
    config_comments=(
        "{prompt}",
        "# base_size = 1024          # 1024 or 768 (the encoder's two view sizes)",
        "# image_size = 768          # 768 or 1024",
    ),
)
