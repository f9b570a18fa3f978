"""GLM-OCR's facts for the registry (light: no torch import)."""

from ..registry import FamilySpec

PROMPT_TEXT = "Text Recognition:"
PROMPT_FORMULA = "Formula Recognition:"
PROMPT_TABLE = "Table Recognition:"
TASK_PROMPTS: dict[str, str] = {"text": PROMPT_TEXT, "formula": PROMPT_FORMULA, "table": PROMPT_TABLE}

SPEC = FamilySpec(
    kind="glm-ocr",
    title="GLM-OCR",
    model="deepseek_ocr_server.models.glm_ocr.model:GlmOcrModel",
    repo="zai-org/GLM-OCR",
    default_prompt=PROMPT_TEXT,
    prompts=tuple(TASK_PROMPTS.values()),
    # its reference: greedy, no n-gram ban, up to 8192 new tokens (a dense page runs long)
    defaults={"no_repeat_ngram_size": 0, "max_new_tokens": 8192},
    quantize_skip=frozenset({"visual"}),
    test_checkpoint="deepseek_ocr_server.testing.glm_ocr:build_tiny_checkpoint",
    config_comments=('{prompt}   # or "Formula Recognition:", "Table Recognition:"',),
)
