"""The CPU attention kernels (query tiles for bf16, matmul-softmax-matmul for decode) against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek_ocr_server.models.common.cache import KVCache, decode_attention
from deepseek_ocr_server.models.paddleocr_vl import attention


def _reference(q, k, v, scale, causal):
    hk, g, s, d = q.shape
    kk = k.float().repeat_interleave(g, 0)[None]
    vv = v.float().repeat_interleave(g, 0)[None]
    o = F.scaled_dot_product_attention(
        q.float().reshape(1, hk * g, s, d), kk, vv, is_causal=causal, scale=scale
    )
    return o.view(hk, g, s, d)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tiled_attention_matches_sdpa(monkeypatch, causal: bool, dtype: torch.dtype) -> None:
    monkeypatch.setattr(attention, "TILE_ELEMENTS", 3000)  # many query tiles, uneven last tile
    gen = torch.Generator().manual_seed(0)
    hk, g, s, d = 2, 4, 70, 16
    q = torch.randn(hk, g, s, d, generator=gen).to(dtype)
    k = torch.randn(hk, s, d, generator=gen).to(dtype)
    v = torch.randn(hk, s, d, generator=gen).to(dtype)
    out = attention.tiled_attention(q, k, v, d**-0.5, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), _reference(q, k, v, d**-0.5, causal), atol=tol, rtol=0)


def test_decode_attention_matches_sdpa() -> None:
    """The decode step's attention (the toolkit's, over a KV cache) against SDPA: 2 kv heads x 8."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 32, generator=gen)
    k = torch.randn(2, 50, 32, generator=gen)
    v = torch.randn(2, 50, 32, generator=gen)
    cache = KVCache(1, 2, 32, 50, torch.float32, "cpu")
    cache.write(0, k[:, :49], v[:, :49])
    cache.advance(49)
    out = decode_attention(q.reshape(1, 16, 32), k[None, :, 49], v[None, :, 49], [cache], 0, 32**-0.5)
    ref = _reference(q[:, :, None], k, v, 32**-0.5, False)[:, :, 0]
    torch.testing.assert_close(out.view(2, 8, 32), ref, atol=1e-5, rtol=0)


def test_tiled_attention_prescaled_single_group(monkeypatch) -> None:
    # vision path: one query head per kv head, q already multiplied by the scale, strided views
    monkeypatch.setattr(attention, "TILE_ELEMENTS", 4000)
    gen = torch.Generator().manual_seed(2)
    n, h, d = 90, 3, 16
    qkv = torch.randn(n, 3, h, d, generator=gen).bfloat16()
    q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))  # [H, N, d] non-contiguous, like the encoder
    out = attention.tiled_attention((q * d**-0.5)[:, None], k, v, 1.0)
    ref = _reference(q[:, None], k, v, d**-0.5, False)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
