"""PaddleOCR-VL 1.5 (0.9B): PaddleOCR-VL's architecture and 620-tensor checkpoint layout, retrained; its
own pixel budget, two more tasks (seal recognition, text spotting) and the spotting preprocessing. The
network, loading and decoding are PaddleOCR-VL's (``models/paddleocr_vl``)."""
