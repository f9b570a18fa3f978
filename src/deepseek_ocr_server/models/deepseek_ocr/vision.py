"""DeepEncoder: SAM ViT-B + CLIP-L fed with SAM features + linear projector.

Module and parameter names mirror the original checkpoint (``model.sam_model.*``,
``model.vision_model.*``, ``model.projector.layers.*``) so loading is a strict 1:1 map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BetweenLayers, no_pause
from .config import ClipConfig, SamConfig

# Upper bound on the elements of one materialised rel-pos bias chunk in SAM global attention.
_BIAS_CHUNK_ELEMS = 1 << 26
#: Score elements of one tile of the float32 CPU path (:func:`rel_pos_attention`): 8 MB, reused.
_SCORE_TILE_ELEMS = 1 << 21


def _interp_abs_pos_2d(table: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (1, C, g, g) table to size x size: bicubic, antialias, float32, cast back (as the reference resizes its tables)."""
    return F.interpolate(
        table.to(torch.float32), size=(size, size), mode="bicubic", align_corners=False, antialias=True
    ).to(table.dtype)


# --------------------------------------------------------------------------------------------- SAM


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, g, g, C) channels-last


class SamAttention(nn.Module):
    """Multi-head attention with decomposed relative position bias (a height and a width table, added to the scores)."""

    def __init__(self, cfg: SamConfig, rel_size: int) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)
        self.rel_pos_h = nn.Parameter(torch.empty(2 * rel_size - 1, cfg.head_dim))
        self.rel_pos_w = nn.Parameter(torch.empty(2 * rel_size - 1, cfg.head_dim))

    @staticmethod
    def get_rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
        """R[i, k] = table[i - k + size - 1]; the table is linearly resized (f32) to 2*size-1 first
        when its length differs (global blocks at non-pretraining sizes)."""
        length = 2 * size - 1
        if rel_pos.shape[0] != length:
            rel_pos = (
                F.interpolate(rel_pos.to(torch.float32).t().unsqueeze(0), size=length, mode="linear")
                .squeeze(0)
                .t()
                .to(rel_pos.dtype)
            )
        coords = torch.arange(size, device=rel_pos.device)
        return rel_pos[(coords[:, None] - coords[None, :]) + (size - 1)]  # (size, size, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (b, heads, n, hd)
        rh = self.get_rel_pos(h, self.rel_pos_h)
        rw = self.get_rel_pos(w, self.rel_pos_w)
        q = q.reshape(b * self.heads, n, self.head_dim)
        k = k.reshape(b * self.heads, n, self.head_dim)
        v = v.reshape(b * self.heads, n, self.head_dim)
        if q.device.type == "cpu" and q.dtype == torch.float32:
            out = rel_pos_attention(q, k, v, rh, rw, h, w)
            out = out.reshape(b, self.heads, h, w, self.head_dim).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
            return self.proj(out)
        out = torch.empty_like(q)
        step = max(1, _BIAS_CHUNK_ELEMS // (n * n))
        for s in range(0, b * self.heads, step):
            qs = q[s : s + step]
            qr = qs.reshape(-1, h, w, self.head_dim)
            # bias uses the UNSCALED q and is added to q.k^T/sqrt(hd)
            rel_h = torch.einsum("bhwc,hkc->bhwk", qr, rh)
            rel_w = torch.einsum("bhwc,wkc->bhwk", qr, rw)
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, n, n)
            out[s : s + step] = F.scaled_dot_product_attention(
                qs.unsqueeze(1),
                k[s : s + step].unsqueeze(1),
                v[s : s + step].unsqueeze(1),
                attn_mask=bias.unsqueeze(1),
            ).squeeze(1)
        out = out.reshape(b, self.heads, h, w, self.head_dim).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.proj(out)


def rel_pos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + B) v with SAM's decomposed relative-position bias
    ``B[(i, j), (y, x)] = q[i, j] . rh[i, y] + q[i, j] . rw[j, x]`` (the UNSCALED q), without ever
    materialising B over all keys and heads. q/k/v (N, h*w, d) row-major over the h x w grid, rh (h, h, d),
    rw (w, w, d) -> (N, h*w, d).

    Tiles of ~``_SCORE_TILE_ELEMS`` scores (several heads of a small window, or a band of query rows of
    one head of a big grid) run as: a float32 GEMM into a reused buffer, the two bias terms added in place
    while the tile is in cache (broadcast over key columns, then over key rows), softmax into a second
    reused buffer, a GEMM with v. Measured on 2 AVX2 cores: ~2x faster than torch's SDPA fed the full
    bias as a mask (whose 270 MB bias chunks are fresh allocations: page faults at every call), for the
    same result up to float32 rounding."""
    heads, n, d = q.shape
    qg = q.view(heads, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", qg, rh)  # (N, h, w, h): query (i, j) against key row y
    rel_w = torch.einsum("bhwc,wkc->bhwk", qg, rw)  # (N, h, w, w): query (i, j) against key column x
    qs = q * (d**-0.5)
    kt = k.transpose(1, 2)
    if n * n <= _SCORE_TILE_ELEMS:  # whole heads per tile
        group, rows = max(1, _SCORE_TILE_ELEMS // (n * n)), h
    else:  # one head, a band of query rows per tile (bands of even height)
        bands = -(-h // max(1, _SCORE_TILE_ELEMS // (n * w)))
        group, rows = 1, -(-h // bands)
    group = min(group, heads)
    s_buf = torch.empty(group * rows * w * n, dtype=q.dtype)
    p_buf = torch.empty_like(s_buf)
    out = torch.empty_like(q)
    for g0 in range(0, heads, group):
        g1 = min(heads, g0 + group)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            t = (r1 - r0) * w
            scores = s_buf[: (g1 - g0) * t * n].view(g1 - g0, t, n)
            torch.bmm(qs[g0:g1, r0 * w : r1 * w], kt[g0:g1], out=scores)
            grid = scores.view(g1 - g0, r1 - r0, w, h, w)
            grid.add_(rel_h[g0:g1, r0:r1, :, :, None]).add_(rel_w[g0:g1, r0:r1, :, None, :])
            probs = p_buf[: scores.numel()].view_as(scores)
            torch.ops.aten._softmax.out(scores, -1, False, out=probs)
            # either one head (a band of rows) or whole heads: the output slice is contiguous
            torch.bmm(probs, v[g0:g1], out=out[g0:g1, r0 * w : r1 * w])
    return out


class SamMlp(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.lin1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.lin2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))  # exact (erf) GELU in SAM (CLIP uses quick_gelu: the other way round is wrong)


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad bottom/right to a multiple of ws, split into row-major ws x ws windows (the padded tokens are not masked: the reference does not mask them)."""
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
    return x, (hp, wp)


def window_unpartition(
    x: torch.Tensor, ws: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    hp, wp = padded
    h, w = size
    b = x.shape[0] // (hp * wp // ws // ws)
    x = x.reshape(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


class SamBlock(nn.Module):
    def __init__(self, cfg: SamConfig, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = SamAttention(cfg, window_size if window_size > 0 else cfg.grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = SamMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an NCHW map (biased variance, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class SamEncoder(nn.Module):
    """``model.sam_model``: (B, 3, s, s) -> (B, C_out, s/64, s/64)."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(
            SamBlock(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.layers)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.width, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )
        c1, c2 = cfg.downsample_channels
        self.net_2 = nn.Conv2d(cfg.out_chans, c1, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False)
        #: resized tables, keyed on (grid, dtype, device) so a model moved/cast after use gets fresh ones
        self._pos_cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def abs_pos(self, g: int) -> torch.Tensor:
        table = self.pos_embed
        if g == table.shape[1]:
            return table
        key = (g, table.dtype, table.device)
        if key not in self._pos_cache:
            self._pos_cache[key] = _interp_abs_pos_2d(table.permute(0, 3, 1, 2), g).permute(0, 2, 3, 1)
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor, between_layers: BetweenLayers = no_pause) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.abs_pos(x.shape[1])
        for blk in self.blocks:
            x = blk(x)
            between_layers()
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x))


# -------------------------------------------------------------------------------------------- CLIP


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        # present in the checkpoint but never applied: the SAM map replaces CLIP's own patch convolution
        self.patch_embedding = nn.Conv2d(
            3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)
        #: resized tables, keyed on (side, dtype, device) so a model moved/cast after use gets fresh ones
        self._pos_cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def positions(self, m: int) -> torch.Tensor:
        table = self.position_embedding.weight  # (1 + g*g, C)
        g = math.isqrt(table.shape[0] - 1)
        if m == g:
            return table
        key = (m, table.dtype, table.device)
        if key not in self._pos_cache:
            grid = table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
            new = _interp_abs_pos_2d(grid, m).permute(0, 2, 3, 1).reshape(m * m, -1)
            self._pos_cache[key] = torch.cat([table[:1], new], dim=0)  # CLS row untouched
        return self._pos_cache[key]

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        b, c, m, _ = sam_features.shape
        patches = sam_features.flatten(2).transpose(1, 2)  # (B, m*m, C) row-major
        cls = self.class_embedding.to(patches.dtype).expand(b, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.positions(m)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv_proj = nn.Linear(cfg.width, 3 * cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            self.qkv_proj(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional, no mask
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ClipMlp(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu in CLIP (SAM uses the exact GELU)


class ClipLayer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = ClipMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.layers))


class ClipVisionModel(nn.Module):
    """``model.vision_model``: SAM map (B, C, m, m) -> (B, 1 + m*m, C). No post-layernorm."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=1e-5)  # sic: "layrnorm"
        self.transformer = ClipTransformer(cfg)

    def forward(self, sam_features: torch.Tensor, between_layers: BetweenLayers = no_pause) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(sam_features))
        for layer in self.transformer.layers:
            x = layer(x)
            between_layers()
        return x


class Projector(nn.Module):
    """``model.projector``: type "linear", 2048 -> 1280 with bias."""

    def __init__(self, input_dim: int, n_embed: int) -> None:
        super().__init__()
        self.layers = nn.Linear(input_dim, n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def encode_views(
    sam: SamEncoder,
    clip: ClipVisionModel,
    projector: Projector,
    pixels: torch.Tensor,
    between_layers: BetweenLayers = no_pause,
) -> torch.Tensor:
    """(B, 3, s, s) -> (B, m, m, n_embed): SAM -> CLIP(SAM map) -> [CLIP (no CLS) | SAM] -> projector."""
    feats = sam(pixels, between_layers)  # (B, C, m, m)
    b, _, m, _ = feats.shape
    clip_out = clip(feats, between_layers)[:, 1:]  # drop CLS (the projector reads patch positions only)
    fused = torch.cat([clip_out, feats.flatten(2).transpose(1, 2)], dim=-1)  # CLIP first, SAM second
    return projector(fused).reshape(b, m, m, -1)


def arrange_image_embeddings(
    global_feats: torch.Tensor,
    tile_feats: torch.Tensor | None,
    grid: tuple[int, int],
    image_newline: torch.Tensor,
    view_seperator: torch.Tensor,
) -> torch.Tensor:
    """[local mosaic rows + newline] + [global rows + newline] + [view_seperator].

    ``global_feats``: (qb, qb, D); ``tile_feats``: (nw*nh, q, q, D) row-major tiles or None.
    """
    d = global_feats.shape[-1]
    parts = []
    nw, nh = grid
    if tile_feats is not None and (nw > 1 or nh > 1):
        q = tile_feats.shape[1]
        mosaic = tile_feats.reshape(nh, nw, q, q, d).permute(0, 2, 1, 3, 4).reshape(nh * q, nw * q, d)
        nl = image_newline.to(mosaic.dtype).expand(nh * q, 1, d)
        parts.append(torch.cat([mosaic, nl], dim=1).reshape(-1, d))
    qb = global_feats.shape[0]
    nl = image_newline.to(global_feats.dtype).expand(qb, 1, d)
    parts.append(torch.cat([global_feats, nl], dim=1).reshape(-1, d))
    parts.append(view_seperator.to(global_feats.dtype).reshape(1, d))
    return torch.cat(parts, dim=0)
