"""PaddleOCR-VL (0.9B): NaViT SigLIP vision encoder + 2x2 projector + ERNIE-4.5-0.3B decoder."""
