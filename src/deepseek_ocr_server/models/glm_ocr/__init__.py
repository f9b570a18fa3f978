"""GLM-OCR (zai-org/GLM-OCR): CogViT-style vision tower, SwiGLU merger, GLM-0.5B-class decoder."""
