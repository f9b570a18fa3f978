"""Shared test configuration. Each area keeps its fixtures in ``tests/fixtures/<area>.py``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["fixtures.deepseek_ocr", "fixtures.deepseek_ocr2", "fixtures.paddleocr_vl", "fixtures.server"]
