"""DeepSeek-OCR 2 against transformers' native ``deepseek_ocr2`` implementation (test-only oracle) on the
same tiny random checkpoint in the ORIGINAL layout: prompt ids and image-token counts per image shape and
resolution mode, pixels, prefill logits, cached decode steps and greedy tokens (float32)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageOps

from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.models.deepseek_ocr.processor import normalize

transformers = pytest.importorskip("transformers")

#: our resolution modes -> transformers' processor arguments for the same rule
MODES = {
    "crop": VisionSettings(base_size=1024, image_size=768, crop_mode=True),  # the default
    "base": VisionSettings(base_size=1024, image_size=1024, crop_mode=False),  # one 1024 view, letter-boxed
    "small": VisionSettings(base_size=1024, image_size=768, crop_mode=False),  # one 768 view, stretched
}
SHAPES = [
    (600, 800),
    (769, 768),
    (1920, 1080),
    (700, 301),
    (1000, 800),
    (1600, 1280),
    (3000, 1000),
    (640, 640),
]
#: (grid, image tokens) the reference gives in crop mode (the spec's worked examples)
CROP_EXPECTED = {
    (600, 800): ((2, 3), 1121), (769, 768): ((2, 2), 833), (1920, 1080): ((2, 1), 545), (700, 301): ((1, 1), 257),
    (1000, 800): ((2, 2), 833), (1600, 1280): ((3, 2), 1121), (3000, 1000): ((3, 1), 689), (640, 640): ((1, 1), 257),
}  # fmt: skip
#: the shapes each mode is checked on (transformers' PIL processor is slow on big pages)
MODE_SHAPES = {
    "crop": SHAPES,
    "base": [(600, 800), (1920, 1080), (640, 640)],
    "small": [(900, 500), (640, 640)],
}
PIXEL_SHAPES = {**MODE_SHAPES, "crop": [(769, 768), (700, 301), (3000, 1000), (600, 800)]}
PROMPT = "<image>\nFree OCR."
ATOL = 1e-4


def page(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (235, 230, 220))
    img.paste((20, 20, 30), (w // 8, h // 9, w // 2, h // 6))
    img.paste((150, 30, 40), (w // 3, h // 2, w - w // 5, h - h // 7))
    for x in range(0, w, 7):
        img.putpixel((x, (x * 3) % h), (x % 256, 90, 200))
    return img


def tf_processor(ckpt, mode: str):
    s = MODES[mode]
    view = s.base_size if s.crop_mode else s.image_size
    ip = transformers.DeepseekOcr2ImageProcessorPil(
        size={"height": view, "width": view}, tile_size=s.image_size
    )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    return transformers.DeepseekOcr2Processor(image_processor=ip, tokenizer=tok)


def tf_inputs(ckpt, mode: str, img: Image.Image):
    return tf_processor(ckpt, mode)(
        images=img, text=PROMPT, return_tensors="pt", crop_to_patches=MODES[mode].crop_mode
    )


@pytest.mark.parametrize("mode", sorted(MODES))
def test_prompt_ids_and_image_token_counts(deepseek2_ckpt, deepseek2_model, mode):
    """Same ids as transformers' processor after our BOS (it leaves BOS to the converted tokenizer,
    which the tiny one does not add), same image-token count and tile count, for every shape."""
    model = deepseek2_model
    for w, h in MODE_SHAPES[mode]:
        img = page(w, h)
        prepared = model.prepare(PROMPT, [img], MODES[mode])
        pre = prepared.inputs["images"][0]
        ref = tf_inputs(deepseek2_ckpt, mode, img)
        ids = ref["input_ids"][0].tolist()
        assert prepared.input_ids[0] == model.bos_token_id
        assert prepared.input_ids[1:] == ids, (mode, w, h)
        n = sum(1 for i in prepared.input_ids if i == model.image_token_id)
        assert n == pre.num_tokens == ids.count(model.image_token_id)
        tiles = 0 if pre.tiles is None else pre.tiles.shape[0]
        assert tiles == int(ref["num_local_patches"][0])
        if mode == "crop":
            assert (pre.grid, n) == CROP_EXPECTED[(w, h)]
        else:
            assert n == {"base": 257, "small": 145}[mode] and pre.tiles is None


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pixels(deepseek2_ckpt, deepseek2_model, mode):
    """Tiles equal transformers' (up to our bf16 rounding of the normalised values, which the reference
    does by casting to bf16); the global view is exactly ``ImageOps.pad`` (letter-box, grey 127, offset
    rounded half-to-even) or, in the 768 mode, the reference's stretch. transformers' letter-box floors the
    offset (one row apart when the margin is 3 mod 4, e.g. 3000x1000) and letter-boxes the 768 mode
    too, so it is compared only where it follows the reference."""
    s = MODES[mode]
    for w, h in PIXEL_SHAPES[mode]:
        img = page(w, h)
        pre = deepseek2_model.prepare(PROMPT, [img], s).inputs["images"][0]
        if s.crop_mode or s.image_size == 1024:
            want = ImageOps.pad(img, (pre.global_view.shape[-1],) * 2, color=(127, 127, 127))
        else:
            want = img.resize((s.image_size, s.image_size), Image.Resampling.BICUBIC)
        assert torch.equal(pre.global_view[0], normalize(want))
        ref = tf_inputs(deepseek2_ckpt, mode, img)
        new_short = round(min(w, h) / max(w, h) * pre.global_view.shape[-1])
        follows_reference = (pre.global_view.shape[-1] - new_short) % 4 != 3 and (mode != "small" or w == h)
        if follows_reference:
            assert (ref["pixel_values"][0] - pre.global_view[0]).abs().max() <= 2e-3
        if pre.tiles is not None:
            assert (ref["pixel_values_local"] - pre.tiles).abs().max() <= 2e-3


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    assert err <= ATOL, f"{what}: max abs err {err:.3g}"


@pytest.mark.parametrize("mode,size", [("crop", (1920, 1080)), ("base", (600, 800)), ("small", (900, 500))])
def test_logits_decode_and_greedy_tokens(deepseek2_model, deepseek2_reference, mode, size):
    """Prefill logits and 10 cached decode steps within 1e-4, greedy tokens identical for 20 steps (both
    sides decode greedily with their own KV cache, from the same pixel tensors)."""
    model, ref = deepseek2_model, deepseek2_reference
    prepared = model.prepare(PROMPT, [page(*size)], MODES[mode])
    pre = prepared.inputs["images"][0]
    ids = torch.tensor([prepared.input_ids])
    kw = {"pixel_values": pre.global_view}
    if pre.tiles is not None:
        kw.update(pixel_values_local=pre.tiles, num_local_patches=[pre.tiles.shape[0]])
    steps = 20
    with torch.no_grad():
        out = ref(input_ids=ids, use_cache=True, **kw)
        want = [out.logits[0, -1]]
        cache = out.cache
        tok = int(want[0].argmax())
        want_tokens = [tok]
        for _ in range(steps - 1):
            out = ref(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
            cache = out.cache
            want.append(out.logits[0, -1])
            tok = int(want[-1].argmax())
            want_tokens.append(tok)

    logits, seq = model.prefill(prepared, steps)
    got, tokens = [logits], [int(logits.argmax())]
    for _ in range(steps - 1):
        logits = model.decode([tokens[-1]], [seq])[0]
        got.append(logits)
        tokens.append(int(logits.argmax()))
    _close(got[0], want[0], "prefill logits")
    for i in range(1, 11):
        _close(got[i], want[i], f"decode step {i}")
    assert tokens == want_tokens
    assert len(set(tokens)) > 1  # the comparison is not between two constant streams


def test_vision_parts_match(deepseek2_model, deepseek2_reference):
    """SAM map and the encoder over [SAM tokens ; queries] (all rows, so the hybrid mask is checked on
    the image rows too) for two 768-px tiles."""
    model, ref = deepseek2_model, deepseek2_reference
    pre = model.prepare(PROMPT, [page(1920, 1080)], MODES["crop"]).inputs["images"][0]
    m, tower = model.net.model, ref.model.vision_tower
    with torch.no_grad():
        sam = m.sam_model(pre.tiles)
        _close(sam, tower.sam_encoder(pre.tiles).last_hidden_state, "SAM")
        x = torch.cat(
            [sam.flatten(2).transpose(1, 2), m.qwen2_model.query_768.weight.expand(2, -1, -1)], dim=1
        )
        want = tower.vision_encoder(inputs_embeds=x, num_patches=144).last_hidden_state
        _close(m.qwen2_model(sam), want[:, 144:], "encoder queries")
        enc = m.qwen2_model
        cos, sin, mask = enc._rope_and_mask(144, x.dtype, x.device)
        h = x
        for layer in enc.model.model.layers:
            h = layer(h, cos, sin, mask)
        _close(enc.model.model.norm(h), want, "encoder, all rows")
