"""ERNIE-4.5-0.3B decoder (``model.*`` + ``lm_head``) with 3-axis multimodal RoPE.

Built from the shared toolkit (``models/common``): pre-norm layers of grouped-query attention and a
gated MLP. What is this family's own: the half-split rotation of each head, and the prefill kernel
(``attention.tiled_attention``: query tiles with batched GEMMs, GQA folded into the GEMM rows).
"""

from __future__ import annotations

import torch

from ..common.blocks import Attention, DecoderLayer, DecoderStack, GatedMLP
from ..common.cache import KVCache
from ..common.rope import half_split_rotary
from .attention import tiled_attention
from .config import PaddleOcrVlConfig


class ErnieAttention(Attention):
    """q/k/v/o without biases, grouped-query, half-split rotary."""

    rotate = staticmethod(half_split_rotary)

    def __init__(self, cfg: PaddleOcrVlConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int):
        """x [S, C] of one sequence starting at cache position 0."""
        s = x.shape[0]
        q, k, v = self.qkv(x, cos, sin)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, S, d]
        if cache.length:
            raise ValueError("this prefill starts on an empty cache")
        cache.write(layer, k, v)
        g = self.num_heads // self.num_kv
        qg = q.transpose(0, 1).reshape(self.num_kv, g, s, self.head_dim)
        o = tiled_attention(qg, k, v, self.head_dim**-0.5, causal=True)  # [Hkv, G, S, d]
        return self.o_proj(o.reshape(self.num_heads, s, self.head_dim).transpose(0, 1).reshape(s, -1))


class ErnieModel(DecoderStack):
    """``model``: embed_tokens -> layers -> norm."""

    def __init__(self, cfg: PaddleOcrVlConfig) -> None:
        h, eps, n = cfg.hidden_size, cfg.rms_norm_eps, cfg.num_hidden_layers
        layers = (DecoderLayer(ErnieAttention(cfg), GatedMLP(h, cfg.intermediate_size), h, eps) for _ in range(n))
        super().__init__(cfg.vocab_size, h, eps, layers, n)
