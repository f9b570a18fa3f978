"""DeepSeek-V2 decoder without MLA (multi-head latent attention), as used by DeepSeek-OCR.

Plain MHA with rotate-half RoPE over the full head dim, layer 0 dense, the others MoE (softmax top-k
routing without renormalisation + one always-on shared expert). Names mirror the checkpoint
(``model.layers.{L}.self_attn.q_proj`` ...). Built from the shared toolkit (``models/common``): what is
this family's own is the MoE and the prefill attention kernel (SDPA, continuing on a non-empty cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.blocks import Attention as _Attention
from ..common.blocks import DecoderLayer, DecoderStack, GatedMLP
from ..common.cache import KVCache
from ..common.rope import rotate_half_rotary
from ..layers import grouped_linear, runs_grouped
from .config import LanguageConfig

#: dense layer, shared experts, routed experts: the shared gated MLP (gate/up fused at load)
Mlp = GatedMLP


class MoEGate(nn.Module):
    """Router: logits, float32 softmax, greedy top-k (the first two steps of the V2 MoE).

    Precision of the logits: HF-V2's ``MoEGate`` is written as an f32 linear, but the official
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
    #: its expert layers run through ``layers.grouped_linear``: a bf16-computing CPU plan keeps them in
    #: the plain layout of the package's grouped kernel (``layers.keep_experts_plain``)
    kernel_experts = True

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
        # one token (a decode step of one sequence): no grouping, no scatter, unless the grouped kernel
        # runs all of its experts in one call (the same sums, in the same expert order)
        if x.shape[0] == 1 and not runs_grouped(self.experts[0].down_proj):
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
        chosen = [self.experts[e] for e in experts.tolist()]
        rows = counts.tolist()
        # each expert's matmuls on its rows (one grouped kernel call for all of them in a decode step);
        # the row-wise activation once for all experts (a decode step of 8 rows runs ~20 experts per
        # layer: per-expert small ops would cost more than the activation)
        h = Mlp.act(grouped_linear([ex.gate_up_proj for ex in chosen], x_sorted, rows))
        y = grouped_linear([ex.down_proj for ex in chosen], h, rows)
        # expert outputs weighted and summed in float32, cast back once (HF-V2 moe_infer); a token's
        # contributions are added in expert order, as in _run_one
        y = y.to(torch.float32) * weights.reshape(-1)[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of, y)
        return out.to(x.dtype)


class Attention(_Attention):
    """MHA (as many kv heads as heads), rotate-half RoPE over the full head dim."""

    rotate = staticmethod(rotate_half_rotary)

    def __init__(self, cfg: LanguageConfig) -> None:
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        super().__init__(h, heads, heads, cfg.head_dim, bias=cfg.attention_bias)

    def prefill(self, x, cos, sin, cache: KVCache, layer: int) -> torch.Tensor:
        """A prompt of T tokens at positions ``cache.length`` .. + T - 1 (a prefill may continue one)."""
        t = x.shape[0]
        start = cache.length
        q, k, v = self.qkv(x, cos, sin)
        kc, vc = cache.write(layer, k.transpose(0, 1), v.transpose(0, 1))
        qq = q.transpose(0, 1).contiguous().unsqueeze(0)
        # SDPA wants contiguous (heads, T, hd) operands: a strided V is several times slower on CPU
        if start == 0:
            kk = k.transpose(0, 1).contiguous().unsqueeze(0)
            vv = v.transpose(0, 1).contiguous().unsqueeze(0)
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        else:  # the cache holds exactly the activation-dtype values written (float32 widens exactly)
            kk = kc.to(q.dtype).unsqueeze(0)
            vv = vc.to(q.dtype).unsqueeze(0)
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        return self.o_proj(out[0].transpose(0, 1).reshape(t, -1))


def decoder_layer(cfg: LanguageConfig, index: int) -> DecoderLayer:
    mlp = MoE(cfg) if cfg.is_moe_layer(index) else Mlp(cfg.hidden_size, cfg.intermediate_size)
    return DecoderLayer(Attention(cfg), mlp, cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV2Decoder(DecoderStack):
    """The text stack under ``model.``: ``embed_tokens``, ``layers``, ``norm`` (lm_head lives at top level)."""

    def __init__(self, cfg: LanguageConfig) -> None:
        n = cfg.num_hidden_layers
        super().__init__(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, (decoder_layer(cfg, i) for i in range(n)), n)
        self.config = cfg
