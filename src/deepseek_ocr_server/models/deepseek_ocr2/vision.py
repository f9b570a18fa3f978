"""DeepEncoder V2: SAM ViT-B (v1's, 896 output channels) -> a Qwen2-shaped transformer used as an encoder
over [SAM tokens ; learned queries] -> the query outputs -> linear projector.

Module and parameter names mirror the original checkpoint: ``model.sam_model.*`` (v1's
:class:`~..deepseek_ocr.vision.SamEncoder`), ``model.qwen2_model.model.model.layers.{i}.*`` and
``.norm`` (the path is doubled in the original: wrapper -> decoder -> its inner Qwen2 model),
``model.qwen2_model.query_768`` / ``query_1024`` and ``model.projector.layers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BetweenLayers, no_pause
from ..common.blocks import GatedMLP, RMSNorm
from ..common.rope import Rope, rotate_half
from .config import QUERY_TABLES, EncoderConfig


class EncoderAttention(nn.Module):
    """Qwen2 attention: grouped-query (each KV head serves ``heads / kv_heads`` consecutive query heads),
    biases on q/k/v, none on o, rotate-half RoPE over the full head dim."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, cfg.heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(d, cfg.kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(d, cfg.kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T, D); cos/sin (T, hd); mask (T, T) bool, True = may attend."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1).contiguous()
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.self_attn = EncoderAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderStack(nn.Module):
    """``qwen2_model.model.model``: the layers and the final norm (no token embedding)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _EncoderWrapper(nn.Module):
    """``qwen2_model.model``: holds the stack (the original's decoder class around its Qwen2 model)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.model = EncoderStack(cfg)


def hybrid_mask(n: int, device: torch.device) -> torch.Tensor:
    """(2n, 2n) bool attention mask over [n image tokens ; n queries]: image tokens see every image token
    and no query; query i sees every image token and queries 0..i (causal among the queries)."""
    idx = torch.arange(2 * n, device=device)
    return (idx[None, :] <= idx[:, None]) | (idx[None, :] < n)


class Qwen2Encoder(nn.Module):
    """``model.qwen2_model``: SAM map (B, D, m, m) -> query outputs (B, m*m, D)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _EncoderWrapper(cfg)
        for name, n in QUERY_TABLES.items():
            setattr(self, name, nn.Embedding(n, cfg.hidden_size))
        self._tables: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def queries(self, n: int) -> torch.Tensor:
        for name, size in QUERY_TABLES.items():
            if size == n:
                return getattr(self, name).weight
        raise ValueError(
            f"no learned queries for {n} image patches (tables: {sorted(QUERY_TABLES.values())})"
        )

    def _rope_and_mask(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (n, dtype, device)
        if key not in self._tables:
            rope = Rope(self.cfg.head_dim, self.cfg.rope_theta, 2 * n, dtype, device)
            self._tables[key] = (rope.cos, rope.sin, hybrid_mask(n, device))
        return self._tables[key]

    def forward(self, sam_features: torch.Tensor, between_layers: BetweenLayers = no_pause) -> torch.Tensor:
        b, _, m, _ = sam_features.shape
        n = m * m
        x = sam_features.flatten(2).transpose(1, 2)  # (B, n, D) raster order
        q = self.queries(n).to(x.dtype).unsqueeze(0).expand(b, -1, -1)
        h = torch.cat([x, q], dim=1)  # positions 0..2n-1 over both parts
        cos, sin, mask = self._rope_and_mask(n, h.dtype, h.device)
        stack = self.model.model
        for layer in stack.layers:
            h = layer(h, cos, sin, mask)
            between_layers()
        return stack.norm(h[:, n:])  # the query outputs; the norm is per token


def encode_views(
    sam: nn.Module,
    encoder: Qwen2Encoder,
    projector: nn.Module,
    pixels: torch.Tensor,
    between_layers: BetweenLayers = no_pause,
) -> torch.Tensor:
    """(B, 3, s, s) -> (B, (s/64)^2, n_embed)."""
    return projector(encoder(sam(pixels, between_layers), between_layers))


def arrange_image_embeddings(
    global_feats: torch.Tensor, tile_feats: torch.Tensor | None, view_seperator: torch.Tensor
) -> torch.Tensor:
    """Splice payload: every tile's tokens (tile-major, row-major over the grid), then the global view's,
    then ONE separator. ``global_feats`` (n, D); ``tile_feats`` (tiles, n_t, D) or None."""
    d = global_feats.shape[-1]
    parts = []
    if tile_feats is not None:
        parts.append(tile_feats.reshape(-1, d))
    parts.append(global_feats)
    parts.append(view_seperator.to(global_feats.dtype).reshape(1, d))
    return torch.cat(parts, dim=0)
