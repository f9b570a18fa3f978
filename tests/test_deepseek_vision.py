"""DeepSeek-OCR vision side: the fused projector input and the image rows that are spliced into the
prompt (SPEC §6.3/§6.4/§8.1), and the resized position tables' caches."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from deepseek_ocr_server.models.deepseek_ocr.config import DeepseekOcrConfig
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.models.deepseek_ocr.vision import ClipEmbeddings, SamEncoder
from deepseek_ocr_server.testing.deepseek_ocr import tiny_config


def _image(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 235, 230))
    d = ImageDraw.Draw(img)
    for i, y in enumerate(range(8, h - 8, 37)):
        d.rectangle((10 + 7 * i, y, w - 20, y + 11), fill=(30 + 20 * i % 200, 10, 90))
    return img


def _by_hand(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """projector(cat[CLIP(SAM(x))[:, 1:], SAM(x) flattened row-major]) -> (B, m, m, D), written out with
    the towers as black boxes and the projector as an explicit affine map (SPEC §6.3); also returns
    the CLIP output (with CLS) and the flattened SAM map."""
    m = model.net.model
    sam = m.sam_model(pixels)  # (B, C, q, q)
    b, _, q, _ = sam.shape
    clip = m.vision_model(sam)  # (B, 1 + q*q, C_clip), CLS first
    assert clip.shape[1] == 1 + q * q
    flat = sam.flatten(2).transpose(1, 2)
    fused = torch.cat([clip[:, 1:], flat], dim=-1)  # CLIP | SAM, CLS dropped
    w, bias = m.projector.layers.weight, m.projector.layers.bias
    return (fused @ w.T + bias).reshape(b, q, q, -1), clip, flat


@pytest.mark.parametrize(
    ("size", "settings", "grid"),
    [
        # small sides keep the tiny model fast; the arithmetic is the same as for the presets
        ((300, 200), VisionSettings(256, 256, False), (1, 1)),  # no crop: global view only
        ((900, 600), VisionSettings(384, 256, True), (3, 2)),  # crop mode: 3x2 tiles of 256 px
    ],
)
def test_spliced_image_rows_are_clip_then_sam_without_cls(deepseek_model_f32, size, settings, grid):
    model = deepseek_model_f32
    prep = model.prepare("<image>\nFree OCR.", [_image(*size)], settings)
    image = prep.inputs["images"][0]
    assert image.grid == grid
    with torch.no_grad():
        spliced = model.embed_prompt(prep)
        mask = torch.tensor(prep.input_ids) == model.image_token_id
        rows = spliced[mask]
        glob, clip, flat = _by_hand(model, image.global_view)
        glob = glob[0]
        tiles = _by_hand(model, image.tiles)[0] if image.tiles is not None else None
    inner = model.net.model
    nl, sep = inner.image_newline, inner.view_seperator
    expected = []
    nw, nh = grid
    if tiles is not None:
        q = tiles.shape[1]
        for r in range(nh * q):  # mosaic rows span all nw tiles, then one newline
            for c in range(nw * q):
                expected.append(tiles[(r // q) * nw + c // q, r % q, c % q])
            expected.append(nl)
    qb = glob.shape[0]
    for r in range(qb):
        expected.extend(glob[r, c] for c in range(qb))
        expected.append(nl)
    expected.append(sep)
    want = torch.stack(expected)
    assert rows.shape == want.shape == (image.num_tokens, model.cfg.language.hidden_size)
    assert torch.allclose(rows, want, atol=1e-5, rtol=1e-5)
    # the text rows are untouched token embeddings
    ids = torch.tensor(prep.input_ids)
    assert torch.equal(spliced[~mask], inner.embed_tokens(ids[~mask]))
    # the check tells the orders apart: SAM|CLIP, or keeping CLS and dropping the last token, differ
    with torch.no_grad():
        swapped = inner.projector(torch.cat([flat, clip[:, 1:]], dim=-1))[0]
        with_cls = inner.projector(torch.cat([clip[:, :-1], flat], dim=-1))[0]
    n_glob = qb * qb
    assert not torch.allclose(swapped, glob.reshape(n_glob, -1), atol=1e-3)
    assert not torch.allclose(with_cls, glob.reshape(n_glob, -1), atol=1e-3)


def _tiny_towers():
    cfg = DeepseekOcrConfig.from_dict(tiny_config())
    sam, emb = SamEncoder(cfg.sam), ClipEmbeddings(cfg.clip)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (*sam.parameters(), *emb.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
    return sam, emb


def test_position_caches_follow_dtype_and_device():
    """The resized SAM/CLIP position tables are cached per (size, dtype, device): casting or moving the
    module after a first use must not hand out the stale table."""
    sam, emb = _tiny_towers()
    a32, c32 = sam.abs_pos(10), emb.positions(10)
    assert a32.dtype == c32.dtype == torch.float32
    sam.to(torch.bfloat16)
    emb.to(torch.bfloat16)
    a16, c16 = sam.abs_pos(10), emb.positions(10)
    assert a16.dtype == c16.dtype == torch.bfloat16
    fresh_sam, fresh_emb = _tiny_towers()
    fresh_sam.to(torch.bfloat16)
    fresh_emb.to(torch.bfloat16)
    assert torch.equal(a16, fresh_sam.abs_pos(10)) and torch.equal(c16, fresh_emb.positions(10))
    assert a16.shape == (1, 10, 10, sam.pos_embed.shape[-1]) and c16.shape == (101, c32.shape[1])
    sam.to("meta")
    emb.to("meta")
    assert sam.abs_pos(10).device.type == emb.positions(10).device.type == "meta"
    assert len(sam._pos_cache) == len(emb._pos_cache) == 3  # one entry per (size, dtype, device)
