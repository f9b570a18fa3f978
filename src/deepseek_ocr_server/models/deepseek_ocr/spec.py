"""DeepSeek-OCR's facts for the registry (light: no torch import)."""

from ..registry import FamilySpec

#: the prompt of a request with an image but no text (the model card's document prompt)
DOCUMENT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."

SPEC = FamilySpec(
    kind="deepseek-ocr",
    title="DeepSeek-OCR",
    model="deepseek_ocr_server.models.deepseek_ocr.model:DeepseekOcrModel",
    repo="deepseek-ai/DeepSeek-OCR",
    default_prompt=DOCUMENT_PROMPT,
    prompts=(DOCUMENT_PROMPT, "<image>\nFree OCR."),
    options=("base_size", "image_size", "crop_mode"),
    quantize_skip=frozenset({"sam_model", "vision_model", "projector"}),
    postprocess="grounding",
    test_checkpoint="deepseek_ocr_server.testing.deepseek_ocr:build_tiny_checkpoint",
    config_comments=(
        "# Optional explicit files (else: <cache_dir>/models/deepseek-ocr/, else download from the repo):",
        '# config = "/path/to/config.json"',
        '# tokenizer = "/path/to/tokenizer.json"',
        '# weights = "/path/to/model.safetensors"',
        "# Default task prompt when a request has an image but no text:",
        "{prompt}",
        "# Per-model inference defaults (any key of [inference]) go here, e.g.:",
        "# base_size = 1024",
        "# image_size = 640",
        "# crop_mode = true",
    ),
)
