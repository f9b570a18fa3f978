"""GLM-OCR's vision tower (``model.visual.*``): patch embedding, 24 pre-norm blocks with q/k RMSNorm and
a 2-D rotary embedding, a 2x2 convolutional downsample and the SwiGLU merger.

All patches of all images of a request form one sequence (each image's patches in 2x2-window order, as
the image processor emits them); attention is block-diagonal per image. On CPU the attention runs in
query tiles with plain GEMMs (``paddleocr_vl.attention.tiled_attention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BetweenLayers, no_pause
from ..common.blocks import GatedMLP, RMSNorm
from ..paddleocr_vl.attention import grid_rotary, image_attention
from .config import VisionConfig


class PatchEmbed(nn.Module):
    """``patch_embed.proj``: a Conv3d whose kernel equals its stride, i.e. one linear map of each
    flattened (channel, frame, y, x) pixel row."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.attention_bias)
        self.proj = nn.Linear(c, c, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(image_attention(q, k, v, cos, sin, lengths))


class VisionMlp(nn.Module):
    """SwiGLU with biases (the biases keep gate/up from being fused into one packed layer)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        b = cfg.attention_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(GatedMLP):
    """``merger``: Linear -> LayerNorm -> GELU (erf) -> SwiGLU (gate/up fused at load), no biases but
    the LayerNorm's."""

    def __init__(self, dim: int, context: int) -> None:
        super().__init__(dim, context)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


def window_positions(grids: list[tuple[int, int, int]], merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch on its image's patch grid, in the processor's window-major order:
    merged row, merged column, then the ``merge x merge`` patches of that window in raster order."""
    rows, cols = [], []
    for t, gh, gw in grids:
        r = torch.arange(gh).view(gh // merge, merge, 1, 1).expand(-1, -1, gw // merge, merge)
        c = torch.arange(gw).view(1, 1, gw // merge, merge).expand(gh // merge, merge, -1, -1)
        rows.append(r.transpose(1, 2).reshape(-1).repeat(t))
        cols.append(c.transpose(1, 2).reshape(-1).repeat(t))
    return torch.cat(rows), torch.cat(cols)


class VisionModel(nn.Module):
    """``model.visual``: patch_embed -> blocks -> post_layernorm -> downsample -> merger."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        m = cfg.spatial_merge_size
        self.downsample = nn.Conv2d(cfg.hidden_size, cfg.out_hidden_size, kernel_size=m, stride=m)
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.out_hidden_size * cfg.in_channels)

    def rotary(
        self, grids: list[tuple[int, int, int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, 1, head_dim/2] (float32): the angle vector is [row*f | col*f] repeated twice, of
        which ``apply_rotary`` takes the first half."""
        row, col = window_positions(grids, self.cfg.spatial_merge_size)
        return grid_rotary(row, col, self.cfg.head_dim, self.cfg.rope_theta, device)

    def downsampled(self, x: torch.Tensor) -> torch.Tensor:
        """The 2x2 stride-2 convolution over consecutive 4-row windows (TL, TR, BL, BR), as one GEMM."""
        w = self.downsample.weight  # [out, C, kh, kw]
        m = self.cfg.spatial_merge_size
        wl = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # columns ordered (kh, kw, C) like the rows
        return F.linear(x.reshape(-1, m * m * x.shape[-1]), wl, self.downsample.bias)

    def forward(
        self,
        pixel_values: torch.Tensor,
        grids: list[tuple[int, int, int]],
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        """``[sum(t*gh*gw), C*T*P*P]`` pixel rows -> ``[sum(t*gh*gw/4), out_hidden]`` merged features."""
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary(grids, x.device)
        lengths = [gh * gw for t, gh, gw in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
            between_layers()
        x = self.downsampled(self.post_layernorm(x))
        return self.merger(x)
