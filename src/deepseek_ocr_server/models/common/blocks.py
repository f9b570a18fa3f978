"""The building blocks every language model here is made of (and a few vision towers reuse).

- :class:`RMSNorm`: ``weight * (x * rsqrt(mean(x^2) + eps))``, the statistics in float32, cast back
  before the weight (the reference models' RMSNorm).
- :class:`GatedMLP`: ``down(silu(gate(x)) * up(x))`` without biases, gate and up run as one layer
  ``gate_up_proj`` (fused at load from the checkpoint's ``gate_proj``/``up_proj``, or stored fused).
- :class:`Attention`: q/k/v fused at load into ``qkv_proj``, then a family's rotary embedding
  (:meth:`Attention.rotate`) and its prefill kernel (:meth:`Attention.prefill`); the decode step is
  shared (:func:`.cache.decode_attention`).
- :class:`DecoderLayer`: the pre-norm residual block ``x + attn(norm(x))``, ``x + mlp(norm(x))``;
  a family with another arrangement of norms overrides :meth:`DecoderLayer.forward`.
- :class:`DecoderStack`: ``embed_tokens`` -> ``layers`` -> ``norm`` and THE layer loop of prefill and
  decode (one place, every family).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BetweenLayers, no_pause
from .cache import KVCache, decode_attention
from .fused import fused_linear

#: ``attend(self_attn, normed_x)`` -> the attention sub-layer's output: prefill or a decode step
Attend = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, times weight."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU without biases: ``down_proj(silu(gate) * up)`` with ``[gate | up] = gate_up_proj(x)``.

    ``stored_fused``: the checkpoint itself holds ``gate_up_proj`` (gate rows first); otherwise it holds
    ``gate_proj`` and ``up_proj`` and they are fused at load (``fused.fused_linear``)."""

    def __init__(self, hidden: int, inter: int, *, stored_fused: bool = False) -> None:
        super().__init__()
        if stored_fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        else:
            fused_linear(self, "gate_up_proj", ("gate_proj", "up_proj"), hidden, (inter, inter))
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))

    @staticmethod
    def act(h: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of ``gate_up_proj``'s output ``[..., 2 * inter]``, row by row."""
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


class Attention(nn.Module):
    """Causal self-attention over a :class:`~.cache.KVCache`: ``q_proj``/``k_proj``/``v_proj`` (fused at
    load into ``qkv_proj``) and ``o_proj``; grouped-query when ``kv_heads < heads``.

    A family sets its rotation (:meth:`rotate`, over ``[T, heads, d]`` with cos/sin broadcast over the
    heads) and its prefill kernel (:meth:`prefill`); :meth:`decode` is the same for all."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = heads, kv_heads, head_dim
        self.split = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        fused_linear(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"), hidden, self.split, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x ``[T, hidden]`` -> q ``[T, heads, d]``, k, v ``[T, kv_heads, d]``, q and k rotated."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv, self.head_dim)
        v = v.view(n, self.num_kv, self.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin), v

    def prefill(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int
    ) -> torch.Tensor:
        """The prompt ``x [T, hidden]`` of one sequence, written into ``cache`` after what it holds."""
        raise NotImplementedError

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache], layer: int
    ) -> torch.Tensor:
        """One new token for each of B sequences (``x [B, hidden]``): the linear layers batched, the
        attention per row over that row's cache."""
        q, k, v = self.qkv(x, cos, sin)
        o = decode_attention(q, k, v, caches, layer, self.head_dim**-0.5)
        return self.o_proj(o.to(x.dtype))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``+ mlp(post_attention_layernorm(x))``."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = x + attend(self.self_attn, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """``embed_tokens`` -> ``layers`` -> ``norm``, and the layer loop of prefill and decode.

    ``num_layers`` of ``layers`` run (a checkpoint may store more after them, e.g. GLM-OCR's
    multi-token-prediction layer); their attention modules set the cache's shape."""

    def __init__(
        self, vocab: int, hidden: int, eps: float, layers: Iterable[nn.Module], num_layers: int
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)  # no padding_idx
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)
        self.num_layers = num_layers

    def decoder_layers(self) -> Iterable[nn.Module]:
        return itertools.islice(self.layers, self.num_layers)

    def new_cache(
        self, capacity: int, dtype: torch.dtype, device: torch.device | str, **options: int
    ) -> KVCache:
        """An empty cache of ``capacity`` positions for these layers (``options``: ``KVCache``'s
        ``limit`` and ``rope_delta``)."""
        attn = self.layers[0].self_attn
        return KVCache(self.num_layers, attn.num_kv, attn.head_dim, capacity, dtype, device, **options)

    def prefill(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        """h ``[T, hidden]``: the input embeddings of T prompt tokens after what ``cache`` holds (cos/sin
        of their positions). Fills the cache; returns the final-normed ``[T, hidden]``. After each layer
        it calls ``between_layers`` (the engine's chance to run a decode step of the other sequences;
        the rule is in ``OcrModel.prefill``'s docstring)."""
        for i, layer in enumerate(self.decoder_layers()):
            h = layer(h, lambda attn, x, i=i: attn.prefill(x, cos, sin, cache, i))
            between_layers()
        cache.advance(h.shape[0])
        return self.norm(h)

    def decode(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]
    ) -> torch.Tensor:
        """h ``[B, hidden]``: one new token per sequence (cos/sin of their positions); returns the
        final-normed ``[B, hidden]`` and advances every cache by one."""
        for c in caches:
            c.reserve(c.length + 1)
        for i, layer in enumerate(self.decoder_layers()):
            h = layer(h, lambda attn, x, i=i: attn.decode(x, cos, sin, caches, i))
        for c in caches:
            c.advance(1)
        return self.norm(h)
