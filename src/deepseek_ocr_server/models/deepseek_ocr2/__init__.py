"""DeepSeek-OCR 2: SAM ViT-B + a Qwen2-shaped encoder with learned queries + the DeepSeek-V2 decoder."""
