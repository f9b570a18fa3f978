"""float16 decode storage of a bfloat16 PaddleOCR-VL (models/layers.py): same greedy tokens as plain
bfloat16 storage over 32 steps, logits close."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from deepseek_ocr_server.models.base import ModelFiles, Prepared
from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel


def _greedy(m: PaddleOcrVlModel, prep: Prepared, n: int, forced: list[int] | None = None):
    """Greedy tokens and the logits of each of ``n`` decode steps (fed ``forced`` tokens when given)."""
    logits, cache = m.prefill(prep, n + 1)
    toks, steps = [], []
    for i in range(n):
        toks.append(int(torch.argmax(logits)))
        logits = m.decode([forced[i] if forced else toks[-1]], [cache])[0]
        steps.append(logits)
    return toks, torch.stack(steps)


def _near_tie(logits: torch.Tensor) -> bool:
    """Top-2 logits within 2 bfloat16 steps of each other: greedy may pick either."""
    top = logits.topk(2).values
    ulp = 2.0 ** (torch.floor(torch.log2(top[0].abs())).item() - 7)
    return bool(top[0] - top[1] <= 2 * ulp)


def _assert_same_greedy(plain: tuple[list[int], torch.Tensor], f16, f16_forced) -> None:
    """float16 storage picks the same greedy token as bfloat16 storage at every step (fed the same
    tokens), except at a near-tie of the bfloat16 logits; the free-running greedy tokens are identical
    up to the first such tie (all 32 when there is none); the logits are close."""
    toks, logits = plain
    ties = [i for i in range(1, len(toks)) if _near_tie(logits[i - 1])]
    first = ties[0] if ties else len(toks)
    assert f16[0][:first] == toks[:first]
    forced_toks, forced_logits = f16_forced
    assert forced_toks[0] == toks[0]
    for i in range(1, len(toks)):
        assert int(torch.argmax(forced_logits[i - 1])) == toks[i] or i in ties, i
    assert len(ties) <= 8, ties  # most steps are compared strictly: the test is not vacuous
    # close (a step may differ more where an MoE router picks another expert from a near-tie)
    assert (forced_logits - logits).abs().mean() <= 0.005 * logits.abs().max()
    assert torch.corrcoef(torch.stack([forced_logits.flatten(), logits.flatten()]))[0, 1] > 0.999


def test_float16_storage_decodes_like_bfloat16(paddle_ckpt):
    m = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=torch.bfloat16)
    assert m.decode_dtype == torch.float16
    assert m.net.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert m.net.lm_head.weight.dtype == torch.float16
    assert m.net.lm_head.batch_weight.dtype == torch.bfloat16  # for prefill and batched decode steps
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    prep = m.prepare("OCR:", [img])
    f16 = _greedy(m, prep, 32)
    m.set_decode_dtype(None)
    assert {p.dtype for p in m.net.parameters()} == {torch.bfloat16}
    plain = _greedy(m, prep, 32)
    m.set_decode_dtype(torch.float16)
    assert m.decode_dtype == torch.float16
    _assert_same_greedy(plain, f16, _greedy(m, prep, 32, forced=plain[0]))
