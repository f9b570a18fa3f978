"""DeepSeek-OCR (v1): SAM ViT-B + CLIP-L vision, DeepSeek-V2 MoE decoder."""
