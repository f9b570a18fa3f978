"""The prefill/vision attention kernel shared by the vision encoder and the decoder (the decode step's
attention is the toolkit's: ``common.cache.decode_attention``).

On CPU, ``tiled_attention`` computes softmax(q k^T * scale) v in query tiles with batched GEMMs
(scores in the activation dtype, softmax in float32), so long image sequences run at matmul speed with
bounded memory. Grouped-query attention folds the query heads of one kv head into the GEMM rows instead
of repeating k/v. On other devices the fused SDPA kernel is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.rope import half_split_rotary as apply_rotary

__all__ = ["TILE_ELEMENTS", "apply_rotary", "tiled_attention"]

#: Score elements per GEMM tile (~4M: 8 MB in bf16, stays cache-friendly between the two GEMMs).
TILE_ELEMENTS = 1 << 22


def grid_rotary(
    row: torch.Tensor, col: torch.Tensor, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[N, 1, head_dim/2]`` (float32) of the 2-D image rotary for patches at (``row``, ``col``):
    the angle vector is ``[row*f | col*f]`` over ``head_dim/4`` frequencies ``theta^(-2i/(head_dim/2))``,
    the first half of the full ``[row*f | col*f | row*f | col*f]`` (what ``image_attention`` rotates
    with). Both image towers (PaddleOCR-VL's, GLM-OCR's) use it; they differ in the patch order."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    rows = row.to(device).float()[:, None] * inv_freq
    cols = col.to(device).float()[:, None] * inv_freq
    ang = torch.cat([rows, cols], dim=-1)[:, None, :]
    return ang.cos(), ang.sin()


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False
) -> torch.Tensor:
    """q [Hkv, G, S, d], k/v [Hkv, L, d] -> [Hkv, G, S, d]. ``causal`` requires L == S.

    CPU + reduced precision: per kv head, query tiles of ~TILE_ELEMENTS scores; q k^T and p v are bf16
    GEMMs, the softmax reads bf16 scores and accumulates in float32 (measured on the 7200-patch page:
    0.6 s per vision layer vs 1.4 s for torch's SDPA). Precision equals transformers' eager attention
    (scores rounded to bf16 before the float32 softmax): torch has no bf16 GEMM with float32 output on
    CPU, and float32 score GEMMs would cost ~2.7x on that half of the work. float32 and other devices: torch's SDPA (its
    float32 CPU kernel is faster than GEMM tiles at float32 GEMM speed)."""
    hk, g, s, d = q.shape
    length = k.shape[1]
    if q.device.type != "cpu" or q.dtype == torch.float32:
        gqa = g > 1
        if gqa and q.device.type == "mps":  # SDPA's enable_gqa is broken on MPS (pytorch#149132)
            k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
            gqa = False
        o = F.scaled_dot_product_attention(
            q.reshape(1, hk * g, s, d), k[None], v[None], is_causal=causal, scale=scale, enable_gqa=gqa
        )
        return o.view(hk, g, s, d)
    out = torch.empty(hk, g, s, d, dtype=q.dtype, device=q.device)
    chunk = max(16, min(s, TILE_ELEMENTS // max(1, g * length)))
    # tile buffers reused across tiles (fresh multi-MB allocations cost page faults every time: ~15%)
    rows = g * chunk
    q_buf = torch.empty(rows * d, dtype=q.dtype)
    s_buf = torch.empty(rows * length, dtype=q.dtype)
    p_buf = torch.empty(rows * length, dtype=q.dtype)
    o_buf = torch.empty(rows * d, dtype=q.dtype) if g > 1 else None
    for h in range(hk):
        kt = k[h].T  # [d, L]
        for s0 in range(0, s, chunk):
            s1 = min(s, s0 + chunk)
            t = s1 - s0
            lim = s1 if causal else length
            if scale == 1.0 and g == 1:  # q already scaled (vision): use it in place
                qs = q[h, :, s0:s1]
            else:
                qs = q_buf[: g * t * d].view(g, t, d)
                torch.mul(q[h, :, s0:s1], scale, out=qs)
            scores = s_buf[: g * t * lim].view(g * t, lim)
            torch.mm(qs.reshape(g * t, d), kt[:, :lim], out=scores)
            if causal:
                mask = torch.ones(t, lim, dtype=torch.bool, device=q.device).triu_(s0 + 1)
                scores.view(g, t, lim).masked_fill_(mask, float("-inf"))
            # softmax accumulates in float32 inside and writes the activation dtype
            probs = p_buf[: g * t * lim].view(g * t, lim)
            torch.ops.aten._softmax.out(scores, -1, False, out=probs)
            if o_buf is None:
                torch.mm(probs, v[h, :lim], out=out[h, 0, s0:s1])
            else:
                o = o_buf[: g * t * d].view(g * t, d)
                torch.mm(probs, v[h, :lim], out=o)
                out[h, :, s0:s1] = o.view(g, t, d)
    return out


def image_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """The vision towers' self-attention core (PaddleOCR-VL's SigLIP, GLM-OCR's CogViT): q, k, v
    ``[N, heads, head_dim]`` of all images' patches, rotary positions cos/sin, each image's patch count in
    ``lengths``. Half-split rotary in float32 with the attention scale folded into q's rotation (no
    separate pass, no extra rounding step), then block-diagonal attention: each image attends to itself
    only. Returns ``[N, heads * head_dim]`` for the output projection."""
    n, _, head_dim = q.shape
    scale = head_dim**-0.5
    q = apply_rotary(q.float(), cos * scale, sin * scale).to(v.dtype)
    k = apply_rotary(k.float(), cos, sin).to(v.dtype)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, N, d]
    outs = []
    start = 0
    for length in lengths:
        sl = slice(start, start + length)
        outs.append(tiled_attention(q[:, None, sl], k[:, sl], v[:, sl], 1.0))
        start += length
    o = torch.cat(outs, dim=2)[:, 0] if len(outs) > 1 else outs[0][:, 0]  # [H, N, d]
    return o.transpose(0, 1).reshape(n, -1)
