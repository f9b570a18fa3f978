"""SAM's float32 CPU attention path (tiled, bias added per tile) against the plain formula."""

from __future__ import annotations

import pytest
import torch

from deepseek_ocr_server.models.deepseek_ocr import vision


def reference(q, k, v, rh, rw, h, w):  # noqa: ANN001, ANN201
    """softmax(q k^T / sqrt(d) + rel_h + rel_w) v with the bias materialised over all keys (float64)."""
    q, k, v, rh, rw = (t.double() for t in (q, k, v, rh, rw))
    heads, n, d = q.shape
    qg = q.view(heads, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", qg, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", qg, rw)
    bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(heads, n, n)
    scores = q @ k.transpose(1, 2) / d**0.5 + bias
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize(
    ("heads", "h", "w", "tile"),
    [
        (6, 4, 4, 1 << 21),  # all heads in one tile
        (6, 4, 4, 600),  # 2 heads per tile, a last partial group
        (3, 6, 5, 70),  # one head, bands of 2 query rows, a partial last band (non-square grid)
        (2, 5, 5, 10),  # one query row per tile
    ],
)
def test_rel_pos_attention_matches_formula(monkeypatch, heads, h, w, tile) -> None:  # noqa: ANN001
    monkeypatch.setattr(vision, "_SCORE_TILE_ELEMS", tile)
    g = torch.Generator().manual_seed(heads * 100 + h)
    d = 8
    q, k, v = (torch.randn(heads, h * w, d, generator=g) for _ in range(3))
    rh = torch.randn(h, h, d, generator=g) * 0.3
    rw = torch.randn(w, w, d, generator=g) * 0.3
    got = vision.rel_pos_attention(q, k, v, rh, rw, h, w)
    want = reference(q, k, v, rh, rw, h, w)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_sam_attention_float32_path_equals_masked_sdpa_path() -> None:
    """The module's float32 CPU path (tiled) and its other path (SDPA with the bias as a mask, used for
    bf16 and other devices) agree."""
    cfg = vision.SamConfig(width=32, heads=4, image_size=96, patch_size=16, window_size=3, mlp_dim=64)
    torch.manual_seed(0)
    attn = vision.SamAttention(cfg, rel_size=6)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 6, 6, 32)
    with torch.inference_mode():
        got = attn(x)
        # the other path: the same module, inputs that are not float32 on CPU take it; run it in float64
        want = attn.double()(x.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
