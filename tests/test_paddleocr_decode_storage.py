"""float16 decode storage of a bfloat16 PaddleOCR-VL (models/layers.py): same greedy tokens as plain
bfloat16 storage over 32 steps, logits close."""

from __future__ import annotations

import numpy as np
import torch
from decode_storage_checks import assert_same_greedy, greedy_steps
from PIL import Image

from deepseek_ocr_server.models.base import ModelFiles
from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel


def test_float16_storage_decodes_like_bfloat16(paddle_ckpt):
    m = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=torch.bfloat16)
    assert m.decode_dtype == torch.float16
    assert m.net.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert m.net.lm_head.weight.dtype == torch.float16
    assert m.net.lm_head.batch_weight.dtype == torch.bfloat16  # for prefill and batched decode steps
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    prep = m.prepare("OCR:", [img])
    f16 = greedy_steps(m, prep, 32)
    m.set_decode_dtype(None)
    assert {p.dtype for p in m.net.parameters()} == {torch.bfloat16}
    plain = greedy_steps(m, prep, 32)
    m.set_decode_dtype(torch.float16)
    assert m.decode_dtype == torch.float16
    assert_same_greedy(plain, f16, greedy_steps(m, prep, 32, forced=plain[0]))
