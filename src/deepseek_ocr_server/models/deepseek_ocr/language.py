"""DeepSeek-V2 decoder without MLA, as used by DeepSeek-OCR (SPEC §8).

Plain MHA with rotate-half RoPE over the full head dim, layer 0 dense, the others MoE (softmax top-k
routing without renormalisation + one always-on shared expert). Names mirror the checkpoint
(``model.layers.{L}.self_attn.q_proj`` ...). The KV cache is preallocated per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BetweenLayers, SequenceCache, no_pause
from .config import LanguageConfig


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) in float32, cast back, times weight (HF-V2 DeepseekV2RMSNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Mlp(nn.Module):
    """down(silu(gate(x)) * up(x)) without biases (dense layer, shared experts, routed experts)."""

    #: gate and up run as one fused layer once packed (``layers.fuse_linears``)
    FUSED = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.project_in(x)))

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """[gate(x) | up(x)] side by side: (T, 2 * inter)."""
        if self.gate_up is not None:
            return self.gate_up(x)
        return torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)

    @staticmethod
    def act(h: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of :meth:`project_in`'s output, row by row."""
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


class MoEGate(nn.Module):
    """Router: logits, float32 softmax, greedy top-k (SPEC §8.2 MoE steps 1-2).

    Precision of the logits: SPEC §8.2 describes HF-V2's ``MoEGate`` as an f32 linear, but the official
    paths never run it that way for a 16-bit model: the HF remote code runs ``infer()`` under
    ``torch.autocast(bfloat16)`` (autocast turns that f32 ``F.linear`` into a bf16 one) and vLLM's gate
    is a bf16 linear. Both therefore softmax bf16-ROUNDED logits, and near-ties between experts are
    decided on those. So a bf16/f16 model computes the logits in its activation dtype and only the
    softmax (and everything after it) in float32; a float32 model stays float32 throughout.
    """

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype in (torch.bfloat16, torch.float16):
            logits = F.linear(x, self.weight.to(x.dtype))  # like the reference's autocast (docstring)
        else:
            logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))
        scores = logits.to(torch.float32).softmax(dim=-1)
        weights, idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx


class MoE(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = nn.ModuleList(
            Mlp(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = (
            Mlp(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, H). Tokens are grouped by expert; only the experts some token selected run."""
        weights, idx = self.gate(x)  # (T, k) f32, (T, k)
        if x.shape[0] == 1:  # one token (a decode step of one sequence): no grouping, no scatter
            y = self._run_one(x, weights[0], idx[0].tolist())
        else:
            y = self._run_grouped(x, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def _run_one(self, x: torch.Tensor, weights: torch.Tensor, idx: list[int]) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j in sorted(range(len(idx)), key=idx.__getitem__):  # expert order, as the grouped path
            out += self.experts[idx[j]](x).to(torch.float32) * weights[j]
        return out.to(x.dtype)

    def _run_grouped(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        token_of = order // k
        x_sorted = x[token_of]  # the rows of each expert are contiguous: one gather, slices per expert
        spans = []
        start = 0
        for e, c in zip(experts.tolist(), counts.tolist(), strict=True):
            spans.append((self.experts[e], start, start + c))
            start += c
        # each expert's matmuls on its rows; the row-wise activation once for all experts (a decode step
        # of 8 rows runs ~20 experts per layer: per-expert small ops would cost more than the activation)
        h = Mlp.act(torch.cat([ex.project_in(x_sorted[a:b]) for ex, a, b in spans]))
        y = torch.cat([ex.down_proj(h[a:b]) for ex, a, b in spans])
        # expert outputs weighted and summed in float32, cast back once (HF-V2 moe_infer); a token's
        # contributions are added in expert order, as in _run_one
        y = y.to(torch.float32) * weights.reshape(-1)[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of, y)
        return out.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    #: q, k and v run as one fused layer once packed (``layers.fuse_linears``)
    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, h, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, h, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, h, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h, h, bias=cfg.attention_bias)
        self.qkv_proj: nn.Module | None = None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (T, H) -> q, k, v as (T, heads, hd), RoPE applied to q and k (cos/sin: (T, hd))."""
        t = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).view(t, 3, self.heads, self.head_dim).unbind(1)
        else:
            q = self.q_proj(x).view(t, self.heads, self.head_dim)
            k = self.k_proj(x).view(t, self.heads, self.head_dim)
            v = self.v_proj(x).view(t, self.heads, self.head_dim)
        c, s = cos[:, None, :], sin[:, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        return q, k, v

    def forward_prefill(self, x, cos, sin, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
        """Prompt of T tokens at positions start..start+T-1; k_cache, v_cache: (heads, cap, hd) of this
        layer (float32 on CPU, see ``KVCache``)."""
        t = x.shape[0]
        q, k, v = self.qkv(x, cos, sin)
        k_cache[:, start : start + t] = k.transpose(0, 1)
        v_cache[:, start : start + t] = v.transpose(0, 1)
        qq = q.transpose(0, 1).contiguous().unsqueeze(0)
        # SDPA wants contiguous (heads, T, hd) operands: a strided V is several times slower on CPU
        if start == 0:
            kk = k.transpose(0, 1).contiguous().unsqueeze(0)
            vv = v.transpose(0, 1).contiguous().unsqueeze(0)
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        else:  # the cache holds exactly the activation-dtype values written (float32 widens exactly)
            kk = k_cache[:, : start + t].to(q.dtype).unsqueeze(0)
            vv = v_cache[:, : start + t].to(q.dtype).unsqueeze(0)
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        return self.o_proj(out[0].transpose(0, 1).reshape(t, -1))

    def forward_decode(self, x, cos, sin, caches: list[KVCache], layer: int) -> torch.Tensor:
        """One token for each of B sequences of different lengths; linears batched, attention per row.

        Query length 1: two batched matrix-vector products over the valid part of the row's cache, in
        the cache dtype, softmax in float32. On CPU the cache is float32 on purpose: bfloat16 batched
        matmuls go to oneDNN, which compiles a kernel for every new shape (6-16 ms each time the
        cache length changes, i.e. every step); float32 ones run at once (50-110 us per layer and row
        at 100-1000 tokens, bench numbers in the README)."""
        q, k, v = self.qkv(x, cos, sin)
        outs = []
        scale = self.head_dim**-0.5
        q = q.to(caches[0].k.dtype).unsqueeze(2)  # (B, heads, 1, hd)
        for i, cache in enumerate(caches):
            pos = cache.length
            n = pos + 1
            kc, vc = cache.k[layer], cache.v[layer]
            kc[:, pos] = k[i]
            vc[:, pos] = v[i]
            scores = torch.matmul(q[i], kc[:, :n].transpose(1, 2))  # (heads, 1, L)
            probs = torch.softmax(scores.to(torch.float32) * scale, dim=-1).to(vc.dtype)
            outs.append(torch.matmul(probs, vc[:, :n]).reshape(1, -1))  # (1, heads*hd)
        return self.o_proj(torch.cat(outs, dim=0).to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp: nn.Module = (
            MoE(cfg) if cfg.is_moe_layer(index) else Mlp(cfg.hidden_size, cfg.intermediate_size)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KVCache(SequenceCache):
    """Preallocated K/V of one sequence: (layers, heads, capacity, head_dim) each."""

    def __init__(self, layers: int, heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        self.k: torch.Tensor = torch.empty(layers, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v: torch.Tensor = torch.empty(layers, heads, capacity, head_dim, dtype=dtype, device=device)
        self.capacity = capacity
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def advance(self, n: int) -> None:
        self._length += n

    def release(self) -> None:
        self.k = self.v = torch.empty(0)
        self.capacity = 0


class Rope:
    """cos/sin tables (float32 math, cast to the activation dtype) for positions 0..max-1."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, dtype, device) -> None:
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim)
        )
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


class DeepseekV2Decoder(nn.Module):
    """The text stack under ``model.``: ``embed_tokens``, ``layers``, ``norm`` (lm_head lives at top level)."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # no padding_idx
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def new_cache(self, capacity: int, dtype, device) -> KVCache:
        c = self.cfg
        return KVCache(c.num_hidden_layers, c.num_attention_heads, c.head_dim, capacity, dtype, device)

    def prefill(
        self, h: torch.Tensor, cache: KVCache, rope: Rope, between_layers: BetweenLayers = no_pause
    ) -> torch.Tensor:
        """h: (T, H) input embeddings; fills the cache from its current length; returns final-normed (T, H)."""
        t = h.shape[0]
        start = cache.length
        if start + t > cache.capacity:
            raise ValueError(f"prompt of {t} tokens does not fit the cache ({cache.capacity - start} free)")
        pos = torch.arange(start, start + t, device=h.device)
        cos, sin = rope(pos)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn.forward_prefill(layer.input_layernorm(h), cos, sin, cache.k[i], cache.v[i], start)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            between_layers()
        cache.advance(t)
        return self.norm(h)

    def decode(self, h: torch.Tensor, caches: list[KVCache], rope: Rope) -> torch.Tensor:
        """h: (B, H), one new token per sequence; returns final-normed (B, H) and advances every cache."""
        for c in caches:
            if c.length >= c.capacity:
                raise ValueError("sequence cache is full (prompt + max_new_tokens reached)")
        pos = torch.tensor([c.length for c in caches], device=h.device)
        cos, sin = rope(pos)
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn.forward_decode(layer.input_layernorm(h), cos, sin, caches, i)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        for c in caches:
            c.advance(1)
        return self.norm(h)
