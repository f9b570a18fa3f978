"""NaViT-style SigLIP vision encoder (``visual.vision_model.*``) and the ``mlp_AR`` projector (2x2 patch merge, then two linear layers).

All patches of all images of a request form one sequence; attention is block-diagonal per image.
On CPU, attention is computed in query tiles with plain GEMMs (``attention.tiled_attention``) so it runs
at matmul speed and never materialises a full [heads, N, N] score matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BetweenLayers, no_pause
from .attention import grid_rotary, image_attention
from .config import PaddleOcrVlConfig, VisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid_per_side**2, cfg.hidden_size)

    def interpolated_positions(self, gh: int, gw: int) -> torch.Tensor:
        """The learned square table resized to (gh, gw) (bilinear, align_corners=False), raster order, f32."""
        side = self.cfg.grid_per_side
        table = self.position_embedding.weight.float().T.reshape(1, -1, side, side)
        grid = F.interpolate(table, size=(gh, gw), mode="bilinear", align_corners=False)
        return grid.reshape(-1, gh * gw).T  # [gh*gw, C]

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = F.linear(
            pixel_values.reshape(pixel_values.shape[0], -1).to(w.dtype),
            w.reshape(w.shape[0], -1),
            self.patch_embedding.bias,
        )  # [N, C]
        pos = [self.interpolated_positions(gh, gw).repeat(t, 1) for t, gh, gw in grids]
        return x + torch.cat(pos).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        n = x.shape[0]
        shape = (n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape)
        k = self.k_proj(x).view(shape)
        v = self.v_proj(x).view(shape)
        return self.out_proj(image_attention(q, k, v, cos, sin, lengths))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, lengths)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    """``visual.vision_model``: embeddings -> encoder layers -> post_layernorm."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def rotary(
        self, grids: list[tuple[int, int, int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, 1, head_dim/2] (float32) of the 2-D rotary; the full angle vector is
        [row*f | col*f | row*f | col*f], of which the first half is returned (see ``apply_rotary``)."""
        rows, cols = [], []
        for t, gh, gw in grids:
            r = torch.arange(gh, device=device).view(gh, 1).expand(gh, gw).reshape(-1)
            c = torch.arange(gw, device=device).view(1, gw).expand(gh, gw).reshape(-1)
            rows.append(r.repeat(t))
            cols.append(c.repeat(t))
        return grid_rotary(torch.cat(rows), torch.cat(cols), self.cfg.head_dim, self.cfg.rope_theta, device)

    def forward(
        self,
        pixel_values: torch.Tensor,
        grids: list[tuple[int, int, int]],
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        x = self.embeddings(pixel_values, grids)
        cos, sin = self.rotary(grids, x.device)
        lengths = [gh * gw for t, gh, gw in grids for _ in range(t)]
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, lengths)
            between_layers()
        return self.post_layernorm(x)


class VisualModel(nn.Module):
    """``visual``: holds ``vision_model`` (original checkpoint prefix ``visual.vision_model.``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(cfg)


class Projector(nn.Module):
    """``mlp_AR``: LayerNorm (eps 1e-5) -> 2x2 merge (TL, TR, BL, BR) -> Linear -> GELU(erf) -> Linear."""

    def __init__(self, cfg: PaddleOcrVlConfig) -> None:
        super().__init__()
        vc = cfg.vision
        self.merge = vc.spatial_merge_size
        merged = vc.hidden_size * self.merge**2
        self.pre_norm = nn.LayerNorm(vc.hidden_size, eps=1e-5)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, cfg.hidden_size)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        m = self.merge
        out = []
        start = 0
        for t, gh, gw in grids:
            f = self.pre_norm(features[start : start + t * gh * gw])
            start += t * gh * gw
            d = f.shape[-1]
            f = f.reshape(t, gh // m, m, gw // m, m, d).transpose(2, 3).reshape(-1, m * m * d)
            out.append(f)
        merged = torch.cat(out) if len(out) > 1 else out[0]
        return self.linear_2(F.gelu(self.linear_1(merged)))
