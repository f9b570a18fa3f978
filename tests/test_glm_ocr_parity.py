"""Parity with transformers' GlmOcrForConditionalGeneration on the same tiny original-layout checkpoint:
prompt ids and image-token counts, pixel rows, 3-axis positions, vision output, prefill logits and 10
cached decode steps within 1e-4 (float32), 20 greedy tokens identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

from deepseek_ocr_server.models.glm_ocr.model import GlmOcrModel

ATOL = 1e-4
STEPS = 20


def _img(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), ((xx + yy) % 256)], -1)
    noise = rng.integers(-40, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


CASES = {
    "one-image": ([(150, 90)], "Text Recognition:"),
    "two-images": ([(150, 90), (60, 200)], "Table Recognition:"),
    "tall": ([(90, 300)], "Formula Recognition:"),
    "wide": ([(400, 60)], "Text Recognition:"),
    "square-upscaled": ([(20, 50)], "Text Recognition:"),
    "text-only": ([], "Hello"),
}


def _reference_inputs(hf, tokenizer, image_processor, template: str, prompt: str, images: list[Image.Image]):
    """What Glm46VProcessor builds: the rendered template, ``<|image|>`` expanded to gh*gw/4 ids per
    image, ``mm_token_type_ids`` marking the image ids."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    rendered = render_jinja_template(
        [[{"role": "user", "content": content}]], chat_template=template, add_generation_prompt=True
    )[0][0]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    inputs: dict = {}
    image_id = hf.config.image_token_id
    counts: list[int] = []
    if images:
        pix = image_processor(images, return_tensors="pt")
        inputs.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
        counts = [t * h * w // 4 for t, h, w in pix["image_grid_thw"].tolist()]
        it = iter(counts)
        ids = [x for t in ids for x in ([t] * next(it) if t == image_id else [t])]
    input_ids = torch.tensor([ids])
    inputs.update(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == image_id).int(),
    )
    return inputs, counts


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(glm_model: GlmOcrModel, glm_hf, glm_ckpt, case: str) -> None:
    sizes, prompt = CASES[case]
    images = [_img(w, h, i) for i, (w, h) in enumerate(sizes)]
    hf, tokenizer, image_processor = glm_hf
    template = (glm_ckpt / "chat_template.jinja").read_text()
    inputs, counts = _reference_inputs(hf, tokenizer, image_processor, template, prompt, images)

    prepared = glm_model.prepare(prompt, images)
    assert prepared.input_ids == inputs["input_ids"][0].tolist()
    image_id = glm_model.config.image_token_id
    assert prepared.input_ids.count(image_id) == sum(counts)
    assert [t * h * w // 4 for t, h, w in prepared.inputs["grids"]] == counts
    if images:
        assert torch.equal(prepared.inputs["pixel_values"], inputs["pixel_values"])
        pos, delta = hf.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        assert torch.equal(prepared.inputs["positions"], pos[:, 0])
        assert prepared.inputs["rope_delta"] == int(delta)
        with torch.no_grad():
            ref_vis = hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        ours = glm_model.encode_images(prepared.inputs["pixel_values"], prepared.inputs["grids"])
        torch.testing.assert_close(ours, ref_vis, atol=ATOL, rtol=0)

    with torch.no_grad():
        ref = hf.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    ref_tokens = ref.sequences[0, inputs["input_ids"].shape[1] :].tolist()

    logits, cache = glm_model.prefill(prepared, STEPS)
    torch.testing.assert_close(logits, ref.logits[0][0], atol=ATOL, rtol=0)
    tokens: list[int] = []
    for step in range(len(ref_tokens)):
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if tok in glm_model.eos_token_ids or step == len(ref_tokens) - 1:
            break
        logits = glm_model.decode([tok], [cache])[0]
        if step < 10:
            torch.testing.assert_close(logits, ref.logits[step + 1][0], atol=ATOL, rtol=0)
    assert tokens == ref_tokens
    assert len(tokens) >= 11  # prefill + 10 compared decode steps at least
