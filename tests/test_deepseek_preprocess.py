"""DeepSeek-OCR preprocessing and prompt construction against SPEC §4, §5, §6.4, §7."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageOps

from deepseek_ocr_server.models.base import InputError
from deepseek_ocr_server.models.deepseek_ocr import processor as P
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.models.deepseek_ocr.vision import arrange_image_embeddings

# SPEC §5.3: candidate order produced by the reference's set + stable sort on CPython 3.11
ORDER_MAX9 = [
    (1, 2),
    (2, 1),
    (3, 1),
    (1, 3),
    (2, 2),
    (4, 1),
    (1, 4),
    (5, 1),
    (1, 5),
    (1, 6),
    (6, 1),
    (3, 2),
    (2, 3),
    (7, 1),
    (1, 7),
    (4, 2),
    (2, 4),
    (1, 8),
    (8, 1),
    (1, 9),
    (3, 3),
    (9, 1),
]
ORDER_MAX6 = [
    (1, 2),
    (2, 1),
    (3, 1),
    (1, 3),
    (4, 1),
    (1, 4),
    (2, 2),
    (1, 5),
    (5, 1),
    (6, 1),
    (2, 3),
    (1, 6),
    (3, 2),
]


def spec_tokens(grid, base=1024, tile=640):
    """SPEC §14: 273 + (10*nh)*(10*nw + 1) when tiled (Gundam), generalised over base/tile sizes."""
    qb, q = base // 64, tile // 64
    nw, nh = grid
    return qb * (qb + 1) + 1 + ((nh * q) * (nw * q + 1) if (nw, nh) != (1, 1) else 0)


def test_candidate_order_matches_reference():
    assert P.candidate_grids(2, 9) == ORDER_MAX9
    assert P.candidate_grids(2, 6) == ORDER_MAX6


# (W, H) -> grid chosen by the HF path (max 9), SPEC §5.3 examples plus extra cases
GRIDS = {
    (100, 60): (1, 1),  # tiny: both sides <= 640 -> no tiles
    (640, 640): (1, 1),  # exactly tile-sized: no tiles
    (640, 200): (1, 1),
    (641, 640): (2, 2),  # square-ish just above the threshold
    (1000, 1000): (2, 2),  # square
    (2000, 2000): (3, 3),  # square and large: the tie rule switches to (3, 3)
    (1280, 1280): (2, 2),  # square, W*H = 1,638,400 < 1,843,200 -> stays (2, 2)
    (600, 800): (2, 3),  # tall
    (1000, 3000): (1, 3),  # tall
    (1240, 1754): (2, 3),  # A4 @150 dpi
    (2480, 3508): (2, 3),  # A4 @300 dpi
    (800, 600): (3, 2),  # wide
    (1920, 1080): (4, 2),  # wide, tie rule for ratio-2 candidates
    (3000, 1000): (3, 1),
    (1280, 640): (2, 1),  # exactly two tiles wide
    (5000, 500): (9, 1),  # very wide
    (20000, 15000): (3, 2),  # huge
}


@pytest.mark.parametrize(("size", "grid"), list(GRIDS.items()))
def test_crop_grid_and_token_count(size, grid):
    w, h = size
    assert P.tile_grid(w, h, 640) == grid
    n = P.num_image_tokens(grid, 1024, 640)
    assert n == spec_tokens(grid)


def test_spec_examples_token_counts():
    # SPEC §5.3 examples (HF, max 9)
    for (w, h), n in {
        (600, 800): 903,
        (640, 640): 273,
        (641, 640): 693,
        (800, 600): 893,
        (1000, 1000): 693,
        (2000, 2000): 1203,
        (1240, 1754): 903,
        (1920, 1080): 1093,
        (3000, 1000): 583,
        (1000, 3000): 603,
        (5000, 500): 1183,
    }.items():
        assert P.num_image_tokens(P.tile_grid(w, h), 1024, 640) == n, (w, h)
    # maximum Gundam count: grid (1, 9)
    assert P.num_image_tokens((1, 9), 1024, 640) == 1263


@pytest.mark.parametrize(("size", "n"), [(512, 73), (640, 111), (1024, 273), (1280, 421)])
@pytest.mark.parametrize("image", [(100, 60), (640, 640), (1000, 1400), (3000, 1000)])
def test_no_crop_presets(size, n, image):
    # SPEC §4: Tiny/Small/Base/Large, q(q+1)+1 with q = size/64, independent of the image size
    pre = P.preprocess(
        Image.new("RGB", image, (10, 20, 30)), base_size=size, image_size=size, crop_mode=False
    )
    assert pre.num_tokens == n
    assert pre.tiles is None and pre.grid == (1, 1)
    assert tuple(pre.global_view.shape) == (1, 3, size, size)


# pixel tensors for every grid case except the two largest images (their grids are checked above)
@pytest.mark.parametrize("size", [s for s in GRIDS if s[0] * s[1] <= 4_000_000])
def test_crop_mode_tensors(size):
    img = Image.new("RGB", size, (200, 100, 50))
    pre = P.preprocess(img, base_size=1024, image_size=640, crop_mode=True)
    nw, nh = GRIDS[size]
    assert pre.grid == (nw, nh)
    assert tuple(pre.global_view.shape) == (1, 3, 1024, 1024)
    if (nw, nh) == (1, 1):
        assert pre.tiles is None
    else:
        assert tuple(pre.tiles.shape) == (nw * nh, 3, 640, 640)
    assert pre.num_tokens == spec_tokens((nw, nh))


def test_arrangement_length_equals_formula():
    d = 4
    for grid in [(1, 1), (2, 3), (4, 2), (1, 9)]:
        nw, nh = grid
        tiles = torch.zeros(nw * nh, 10, 10, d) if grid != (1, 1) else None
        out = arrange_image_embeddings(
            torch.zeros(16, 16, d), tiles, grid, torch.ones(d), torch.full((d,), 2.0)
        )
        assert out.shape[0] == spec_tokens(grid)
        assert torch.equal(out[-1], torch.full((d,), 2.0))  # exactly one separator, last
        assert int((out == 2.0).all(-1).sum()) == 1


def _value(c: int) -> float:
    return float(torch.tensor((c / 255 - 0.5) / 0.5).to(torch.bfloat16).float())


def test_letterbox_fill_and_bf16_rounding():
    img = Image.new("RGB", (2000, 1000), (255, 0, 37))
    g = P.preprocess(img, 1024, 640, True).global_view[0]
    # 2000x1000 -> 1024x512 centred: rows 0..255 and 768..1023 are the gray fill 127 (SPEC §5.2)
    assert torch.all(g[:, :256] == _value(127)) and torch.all(g[:, 768:] == _value(127))
    assert abs(_value(127) - (-0.00392)) < 1e-4
    assert torch.allclose(g[:, 300:700, 10:1000], torch.tensor([1.0, -1.0, _value(37)])[:, None, None])
    assert torch.equal(g, g.to(torch.bfloat16).float())  # bf16-rounded in every dtype (SPEC §5.1)
    # offset uses banker's rounding of (size - new) * 0.5 on Pillow's rounded size
    tall = P.pad_to_square(Image.new("RGB", (333, 1000), (255, 255, 255)), 1024)
    new_w = round(333 / 1000 * 1024)
    x0 = round((1024 - new_w) * 0.5)
    assert tall.getpixel((x0 - 1, 500)) == (127, 127, 127) and tall.getpixel((x0 + 5, 500)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("size", "target"),
    [
        ((333, 1000), 1024),  # tall, downscaled; odd margin 683: offset round(341.5) = 342 (banker's)
        ((2000, 1000), 1024),  # wide, exact 2:1
        ((641, 640), 1024),  # near-square: a 2 px gray margin
        ((100, 60), 512),  # upscaled
        ((300, 300), 640),  # square: no margin at all
        ((2049, 2048), 1024),  # short side rounds to the full size
        ((37, 999), 640),  # thin but >= 1 px after scaling (the clamp case is not compared)
    ],
)
def test_letterbox_equals_pillow_imageops_pad(size, target):
    """Our pad_to_square is pixel-identical to ``ImageOps.pad(img, (s, s), color=(127,)*3)`` with
    Pillow's defaults (BICUBIC, centring 0.5), the reference's call (SPEC §5.2)."""
    w, h = size
    noise = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(w * 7 + h))
    img = Image.fromarray(noise.to(torch.uint8).numpy(), mode="RGB")
    want = ImageOps.pad(img, (target, target), color=(127, 127, 127))
    got = P.pad_to_square(img, target)
    assert got.size == want.size == (target, target) and got.mode == want.mode
    assert got.tobytes() == want.tobytes()


def test_small_presets_stretch_instead_of_letterbox():
    img = Image.new("RGB", (1000, 200), (255, 255, 255))
    g = P.preprocess(img, 640, 640, False).global_view
    assert torch.all(g == 1.0)  # stretched: no gray bars (SPEC §5.2, pitfall 15)
    g = P.preprocess(img, 1024, 1024, False).global_view
    assert torch.any(g[0, 0] == _value(127))  # Base letter-boxes


def test_tiles_come_from_the_resized_original():
    img = Image.new("RGB", (1280, 640), (255, 0, 0))
    img.paste((0, 0, 255), (640, 0, 1280, 640))
    pre = P.preprocess(img, 1024, 640, True)
    assert pre.grid == (2, 1)
    red, blue = pre.tiles[0], pre.tiles[1]
    assert torch.all(red[0, :, :600] == 1.0) and torch.all(red[2, :, :600] == -1.0)
    assert torch.all(blue[2, :, 40:] == 1.0) and torch.all(blue[0, :, 40:] == -1.0)


def test_image_modes_and_exif():
    for mode in ("RGBA", "P", "L", "CMYK", "LA", "1"):
        assert P.to_rgb(Image.new(mode, (20, 10))).mode == "RGB"
    sixteen = Image.new("I;16", (4, 4), 65535)
    assert P.to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("I;16", (4, 4), 32768)
    assert P.to_rgb(half).getpixel((0, 0)) == (128, 128, 128)
    # EXIF orientation 6 (rotate 90 CW) swaps width and height
    img = Image.new("RGB", (300, 100), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert P.to_rgb(Image.open(io.BytesIO(buf.getvalue()))).size == (100, 300)
    # a 1-pixel-high strip does not crash the letter-box (SPEC §5.4)
    assert P.pad_to_square(Image.new("RGB", (5000, 1)), 1024).size == (1024, 1024)


# ------------------------------------------------------------------------------------ prompts


def enc(model, text):
    return model.tokenizer.encode(text, add_special_tokens=False).ids


def test_prompt_layout(deepseek_model_f32):
    m = deepseek_model_f32
    img = Image.new("RGB", (640, 640))
    p = m.prepare("<image>\n<|grounding|>Convert the document to markdown. ", [img])
    img_id = m.image_token_id
    expected = [0] + [img_id] * 273 + enc(m, "\n<|grounding|>Convert the document to markdown.")
    assert p.input_ids == expected  # BOS, N placeholders, text stripped like HF, no EOS
    grounding = m.tokenizer.token_to_id("<|grounding|>")
    assert p.input_ids.count(grounding) == 1  # special tokens are atomic
    assert p.input_ids.count(img_id) == p.inputs["images"][0].num_tokens
    # an image without a marker is placed first, as "<image>\n" + text
    assert m.prepare("<|grounding|>Convert the document to markdown.", [img]).input_ids == expected


def test_prompt_tiled_counts(deepseek_model_f32):
    m = deepseek_model_f32
    p = m.prepare("Free OCR.", [Image.new("RGB", (1000, 1400))], VisionSettings(1024, 640, True))
    assert p.input_ids.count(m.image_token_id) == 903
    p = m.prepare("Free OCR.", [Image.new("RGB", (1000, 1400))], VisionSettings(512, 512, False))
    assert p.input_ids.count(m.image_token_id) == 73


def test_text_only_system_and_errors(deepseek_model_f32):
    m = deepseek_model_f32
    assert m.prepare("hello there", []).input_ids == [0] + enc(m, "hello there")
    p = m.prepare("Free OCR.", [Image.new("RGB", (64, 64))], system="Be terse.")
    assert p.input_ids[: 1 + len(enc(m, "Be terse.\n"))] == [0] + enc(m, "Be terse.\n")
    with pytest.raises(InputError, match="at most one image"):
        m.prepare("two", [Image.new("RGB", (8, 8))] * 2)
    with pytest.raises(InputError, match="system message"):
        m.prepare("x", [Image.new("RGB", (8, 8))], system="see <image>")
    with pytest.raises(InputError, match="markers"):
        m.prepare("<image>\nno image here", [])
    with pytest.raises(InputError, match="context"):
        m.prepare("x" * (m.max_context + 5), [])
    with pytest.raises(InputError, match="base_size"):
        m.prepare("x", [Image.new("RGB", (8, 8))], VisionSettings(1000, 640, True))
