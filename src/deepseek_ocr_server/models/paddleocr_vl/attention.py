"""Attention kernels shared by the vision encoder and the decoder.

On CPU, ``tiled_attention`` computes softmax(q k^T * scale) v in query tiles with batched GEMMs
(scores in the activation dtype, softmax in float32), so long image sequences run at matmul speed with
bounded memory. Grouped-query attention folds the query heads of one kv head into the GEMM rows instead
of repeating k/v. On other devices the fused SDPA kernel is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Score-tile size (elements) per call; ~64 MB of float32 scores.
TILE_ELEMENTS = 1 << 24


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False
) -> torch.Tensor:
    """q [Hkv, G, S, d], k/v [Hkv, L, d] -> [Hkv, G, S, d]. ``causal`` requires L == S."""
    hk, g, s, d = q.shape
    length = k.shape[1]
    if q.device.type != "cpu":
        o = F.scaled_dot_product_attention(
            q.reshape(1, hk * g, s, d), k[None], v[None], is_causal=causal, scale=scale, enable_gqa=g > 1
        )
        return o.view(hk, g, s, d)
    out = torch.empty_like(q)
    kt = k.transpose(1, 2)  # [Hkv, d, L]
    chunk = max(16, min(s, TILE_ELEMENTS // max(1, hk * g * length)))
    for s0 in range(0, s, chunk):
        s1 = min(s, s0 + chunk)
        t = s1 - s0
        lim = s1 if causal else length
        qs = (q[:, :, s0:s1] * scale).reshape(hk, g * t, d)
        scores = torch.bmm(qs, kt[:, :, :lim]).float()
        if causal:
            mask = torch.ones(t, lim, dtype=torch.bool, device=q.device).triu_(s0 + 1)
            scores.view(hk, g, t, lim).masked_fill_(mask, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(v.dtype)
        out[:, :, s0:s1] = torch.bmm(p, v[:, :lim]).view(hk, g, t, d)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query position over a cache: q [Hkv, G, d], k/v [Hkv, L, d] -> [Hkv, G, d].

    Plain matmul-softmax-matmul (fast at query length 1, unlike SDPA on CPU)."""
    scores = torch.bmm(q * scale, k.transpose(1, 2)).float()
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.bmm(p, v)
