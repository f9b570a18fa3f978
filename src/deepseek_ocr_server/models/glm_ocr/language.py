"""GLM-OCR's decoder (``model.language_model.*`` + ``lm_head``): 16 layers with "sandwich" RMSNorms
(each sub-layer's output is normalised before the residual add), grouped-query attention with
head_dim 128, and a 3-axis multimodal rotary embedding applied to ADJACENT PAIRS of each head
(frequency i rotates dims 2i and 2i+1; frequencies take their position from the temporal, height or
width axis in contiguous sections).

The attention itself (prefill tiles, batched decode over per-sequence caches, fused q/k/v) and the KV
cache are PaddleOCR-VL's (``paddleocr_vl.language``): only the rotation differs.
The checkpoint also stores a multi-token-prediction layer after the last decoder layer
(:class:`MtpLayer`, ``layers.<num_hidden_layers>``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..paddleocr_vl.language import ErnieAttention, KVCache, RMSNorm
from .config import GlmOcrConfig


def apply_rotary_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: ``(x[2i], x[2i+1])`` by angle i, with ``cos``/``sin`` given per pair
    (``[..., head_dim/2]``, broadcast over the leading dims)."""
    xp = x.unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


class GlmKVCache(KVCache):
    """One sequence's keys (post-rotary) and values for every decoder layer (PaddleOCR-VL's layout)."""


class GlmAttention(ErnieAttention):
    """q/k/v/o without biases, GQA; the pairwise rotary instead of the half-split one."""

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
        return apply_rotary_pairs(q, cos, sin), apply_rotary_pairs(k, cos, sin), v


class GlmMLP(nn.Module):
    """SwiGLU with the checkpoint's fused ``gate_up_proj`` (first half gate, second half up)."""

    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class GlmDecoderLayer(nn.Module):
    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = GlmAttention(cfg)  # type: ignore[arg-type]  # same field names
        self.mlp = GlmMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, eps)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))

    def prefill(self, x, cos, sin, cache: KVCache, layer: int) -> torch.Tensor:
        a = self.self_attn.prefill(self.input_layernorm(x), cos, sin, cache, layer)
        return self._mlp(x + self.post_self_attn_layernorm(a))

    def decode(self, x, cos, sin, caches: list[KVCache], layer: int) -> torch.Tensor:
        a = self.self_attn.decode(self.input_layernorm(x), cos, sin, caches, layer)
        return self._mlp(x + self.post_self_attn_layernorm(a))


class SharedHead(nn.Module):
    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MtpLayer(GlmDecoderLayer):
    """The multi-token-prediction head stored as ``layers.<num_hidden_layers>``: a draft model that
    predicts the token after next from (embedding of the next token, last hidden state):
    ``enorm``/``hnorm`` on each, concatenated, ``eh_proj``, one decoder layer, ``shared_head``.

    Kept in the module tree so the strict loader checks every one of its tensors by name and shape;
    :meth:`GlmOcrModel.load` does not read its data (plain decoding never uses it; see there)."""

    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)


class GlmTextModel(nn.Module):
    """``model.language_model``: embed_tokens -> layers (decoder layers, then the MTP layers) -> norm."""

    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers: list[nn.Module] = [GlmDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        layers += [MtpLayer(cfg) for _ in range(cfg.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", self._inv_freq(torch.device("cpu")), persistent=False)
        self.register_buffer("rope_axis", self._rope_axis(torch.device("cpu")), persistent=False)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        d = self.cfg.head_dim
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    def _rope_axis(self, device: torch.device) -> torch.Tensor:
        """Frequency i takes its position from axis rope_axis[i]: 0 (t), 1 (h), 2 (w), in sections."""
        t, h, _ = self.cfg.mrope_section
        axis = torch.full((self.cfg.head_dim // 2,), 2, dtype=torch.long, device=device)
        axis[:t] = 0
        axis[t : t + h] = 1
        return axis

    def rebuild_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent buffers (after building on the ``meta`` device)."""
        self.inv_freq = self._inv_freq(device)
        self.rope_axis = self._rope_axis(device)

    @property
    def decoder_layers(self) -> list[GlmDecoderLayer]:
        """The layers plain decoding runs (without the MTP layers)."""
        return list(self.layers)[: self.cfg.num_hidden_layers]  # type: ignore[return-value]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, S] (t, h, w) -> cos, sin [S, head_dim/2], computed in float32, cast to ``dtype``."""
        pos = positions.float()
        ang = pos.gather(0, self.rope_axis[:, None].expand(-1, pos.shape[1]))  # [d/2, S]
        ang = ang.T * self.inv_freq
        return ang.cos().to(dtype), ang.sin().to(dtype)
