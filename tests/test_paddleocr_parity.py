"""Full-model parity with transformers' PaddleOCRVLForConditionalGeneration on the same tiny original-layout
checkpoint: prefill logits, 10 cached decode steps, 20 greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel

ATOL = 1e-4
STEPS = 20


def _img(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth-ish content (a gradient plus noise) so neighbouring patches differ but are not pure noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), ((xx + yy) % 256)], -1)
    noise = rng.integers(-40, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


CASES = {
    "one-image": ([(150, 90)], "OCR:"),
    "two-images-upsampled-pos-table": ([(150, 90), (1000, 120)], "Table Recognition:"),
    "tall": ([(90, 300)], "Formula Recognition:"),
    "square": ([(200, 200)], "OCR:"),
    "wide": ([(400, 60)], "Chart Recognition:"),
    "text-only": ([], "OCR:"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(paddle_model: PaddleOcrVlModel, paddle_hf, case: str) -> None:
    sizes, prompt = CASES[case]
    images = [_img(w, h, i) for i, (w, h) in enumerate(sizes)]
    hf_model, processor = paddle_hf
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    prepared = paddle_model.prepare(prompt, images)
    assert prepared.input_ids == inputs["input_ids"][0].tolist()
    if images:
        assert max(g[2] for g in prepared.inputs["grids"]) >= 6
        if case.startswith("two"):
            assert max(g[2] for g in prepared.inputs["grids"]) > 27  # position table is up-sampled

    with torch.no_grad():
        ref = hf_model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    ref_tokens = ref.sequences[0, inputs["input_ids"].shape[1] :].tolist()

    logits, cache = paddle_model.prefill(prepared, STEPS)
    torch.testing.assert_close(logits, ref.logits[0][0], atol=ATOL, rtol=0)
    tokens: list[int] = []
    for step in range(len(ref_tokens)):
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if tok in paddle_model.eos_token_ids or step == len(ref_tokens) - 1:
            break
        logits = paddle_model.decode([tok], [cache])[0]
        if step < 10:
            torch.testing.assert_close(logits, ref.logits[step + 1][0], atol=ATOL, rtol=0)
    assert tokens == ref_tokens
    assert len(tokens) >= 10
