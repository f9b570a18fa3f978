"""PaddleOCR-VL's facts for the registry (light: no torch import)."""

from ..registry import FamilySpec

#: Task prompts the model was trained on (exact strings, no trailing space).
PROMPT_OCR = "OCR:"
PROMPT_TABLE = "Table Recognition:"
PROMPT_FORMULA = "Formula Recognition:"
PROMPT_CHART = "Chart Recognition:"
#: Only PaddleOCR-VL 1.5+.
PROMPT_SEAL = "Seal Recognition:"
PROMPT_SPOTTING = "Spotting:"
TASK_PROMPTS: dict[str, str] = {
    "ocr": PROMPT_OCR,
    "table": PROMPT_TABLE,
    "formula": PROMPT_FORMULA,
    "chart": PROMPT_CHART,
    "seal": PROMPT_SEAL,
    "spotting": PROMPT_SPOTTING,
}

SPEC = FamilySpec(
    kind="paddleocr-vl",
    title="PaddleOCR-VL",
    model="deepseek_ocr_server.models.paddleocr_vl.model:PaddleOcrVlModel",
    repo="PaddlePaddle/PaddleOCR-VL",
    default_prompt=PROMPT_OCR,
    prompts=(PROMPT_OCR, PROMPT_TABLE, PROMPT_FORMULA, PROMPT_CHART),
    # its reference decodes plain greedy with no n-gram ban: a 20-gram ban would break long legitimate
    # repeats (``<ecel>`` runs in tables, dot leaders)
    defaults={"no_repeat_ngram_size": 0},
    quantize_skip=frozenset({"visual", "mlp_AR"}),
    postprocess="otsl",
    test_checkpoint="deepseek_ocr_server.testing.paddleocr_vl:build_tiny_checkpoint",
    config_comments=("{prompt}",),
)
