"""ERNIE-4.5-0.3B decoder (``model.*`` + ``lm_head``) with 3-axis multimodal RoPE and a per-sequence
preallocated KV cache (SPEC §8).

Prefill runs one prompt through all layers (tiled causal attention, GEMMs in the model dtype).
Decode runs one new token for each of B sequences of different lengths: every linear layer is applied
to all B rows at once; attention runs per row over that row's own cache (float32 matmul-softmax-matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import SequenceCache
from .attention import apply_rotary, decode_attention, tiled_attention
from .config import PaddleOcrVlConfig


class KVCache(SequenceCache):
    """Keys (post-RoPE) and values of one sequence for every layer: ``[layers, kv_heads, capacity, head_dim]``.

    Grows geometrically when full (never per token). ``rope_delta`` turns a cache position into the
    rotary position of the next token: ``position = length + rope_delta`` on all three axes.
    """

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        rope_delta: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.k: torch.Tensor | None = torch.empty(
            layers, kv_heads, capacity, head_dim, dtype=dtype, device=device
        )
        self.v: torch.Tensor | None = torch.empty_like(self.k)
        self._length = 0
        self.rope_delta = rope_delta

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        assert self.k is not None, "cache was released"
        return self.k.shape[2]

    def reserve(self, needed: int) -> None:
        if self.k is None or self.v is None:
            raise RuntimeError("decode on a released cache")
        if needed <= self.capacity:
            return
        new_cap = max(needed, self.capacity * 2)
        shape = (*self.k.shape[:2], new_cap, self.k.shape[3])
        k = torch.empty(shape, dtype=self.k.dtype, device=self.k.device)
        v = torch.empty_like(k)
        k[:, :, : self._length] = self.k[:, :, : self._length]
        v[:, :, : self._length] = self.v[:, :, : self._length]
        self.k, self.v = k, v

    def advance(self, n: int = 1) -> None:
        self._length += n

    def release(self) -> None:
        self.k = None
        self.v = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class ErnieAttention(nn.Module):
    #: q, k and v run as one fused layer once packed (``layers.fuse_linears``)
    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, cfg: PaddleOcrVlConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None

    def _qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        n = h.shape[0]
        if self.qkv_proj is not None:
            kv = self.num_kv * self.head_dim
            q, k, v = self.qkv_proj(h).split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv, self.head_dim)
        v = v.view(n, self.num_kv, self.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        return q, k, v

    def prefill(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int):
        """h [S, C] of one sequence starting at cache position 0."""
        s = h.shape[0]
        q, k, v = self._qkv(h, cos, sin)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, S, d]
        assert cache.k is not None and cache.v is not None
        cache.k[layer, :, :s] = k
        cache.v[layer, :, :s] = v
        g = self.num_heads // self.num_kv
        qg = q.transpose(0, 1).reshape(self.num_kv, g, s, self.head_dim)
        o = tiled_attention(qg, k, v, self.head_dim**-0.5, causal=True)  # [Hkv, G, S, d]
        return self.o_proj(o.reshape(self.num_heads, s, self.head_dim).transpose(0, 1).reshape(s, -1))

    def decode(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache], layer: int
    ):
        """h [B, C]: one new token per sequence; row b is written at ``caches[b].length``."""
        q, k, v = self._qkv(h, cos, sin)
        g = self.num_heads // self.num_kv
        outs = []
        assert caches[0].k is not None
        # every row's query in the cache dtype and scaled at once (the same numbers as row by row)
        qs = q.view(len(caches), self.num_kv, g, self.head_dim).to(caches[0].k.dtype) * self.head_dim**-0.5
        for b, cache in enumerate(caches):
            assert cache.k is not None and cache.v is not None
            pos = cache.length
            kc, vc = cache.k[layer], cache.v[layer]
            kc[:, pos] = k[b]
            vc[:, pos] = v[b]
            outs.append(decode_attention(qs[b], kc[:, : pos + 1], vc[:, : pos + 1], None).reshape(-1))
        o = torch.stack(outs).to(h.dtype)
        return self.o_proj(o)


class ErnieMLP(nn.Module):
    #: gate and up run as one fused layer once packed (``layers.fuse_linears``)
    FUSED = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, cfg: PaddleOcrVlConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PaddleOcrVlConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = ErnieAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = ErnieMLP(cfg)

    def prefill(self, x, cos, sin, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.self_attn.prefill(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, caches: list[KVCache], layer: int) -> torch.Tensor:
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, caches, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class ErnieModel(nn.Module):
    """``model``: embed_tokens -> layers -> norm."""

    def __init__(self, cfg: PaddleOcrVlConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        t, h, _ = cfg.mrope_section
        axis = torch.full((d // 2,), 2, dtype=torch.long)
        axis[:t] = 0
        axis[t : t + h] = 1
        # frequency slot j takes its position from axis[j] (contiguous sections: T, then H, then W)
        self.register_buffer("rope_axis", axis, persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, S] (t, h, w) -> cos, sin [S, head_dim/2] (float32, cast to ``dtype``); the full
        128-d vectors repeat these halves (``apply_rotary``)."""
        inv = self.inv_freq.to(positions.device)
        pos = positions.float()  # [3, S]
        ang = pos.gather(0, self.rope_axis.to(positions.device)[:, None].expand(-1, pos.shape[1]))  # [d/2, S]
        ang = ang.T * inv  # [S, d/2]
        return ang.cos().to(dtype), ang.sin().to(dtype)
