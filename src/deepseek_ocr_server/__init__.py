"""deepseek-ocr-server: an OpenAI-compatible OCR server for DeepSeek-OCR and PaddleOCR-VL."""

__version__ = "0.1.0"
