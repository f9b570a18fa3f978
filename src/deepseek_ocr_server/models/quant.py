"""Weight-only int8 quantization of ``nn.Linear`` layers (decode is bound by reading the weights).

Each weight row (output channel) gets one symmetric scale, ``scale = max|w| / 127``, and is stored as
int8: half the bytes of bf16. The layer keeps computing in the activation dtype:

- few rows (decode: one row per running sequence, up to ``Int8Linear.gemv_max_rows``) on CPU:
  ``torch._weight_int8pack_mm``, the int8 weight-only GEMV kernel (2-5x faster than bf16 at 1-2 rows,
  about even at 8, slower beyond 16: its cost grows linearly with the rows);
- more rows (prefill, large batches) or other devices: the int8 weight is converted to the activation
  dtype (integers up to 127 are exact in bf16), multiplied with ``F.linear`` and the per-channel scales
  are applied to the output columns.

``quantize_linears_int8(model.net, skip=...)`` is what the model families' ``load(quantize="int8")``
calls after loading the original (bf16/f32) weights; the skip predicate is the family spec's
``is_vision`` (its ``quantize_skip`` modules: the vision side stays in full precision).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import KernelLinear, PackedLinear, replace_linears

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_weight_int8(weight: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: returns ``(q [N, K] int8, scales [N] float32)``.

    Works on ``rows_per_chunk`` rows at a time so that the float32 temporaries stay small (a 129k-row
    lm_head would otherwise need ~2 GB of them)."""
    w_all = weight.detach()
    n = w_all.shape[0]
    q = torch.empty(w_all.shape, dtype=torch.int8, device=w_all.device)
    scales = torch.empty(n, dtype=torch.float32, device=w_all.device)
    for start in range(0, n, rows_per_chunk):
        w = w_all[start : start + rows_per_chunk].to(torch.float32, copy=True)  # never edit the source
        s = w.abs().amax(dim=1).clamp_(min=1e-12).div_(127.0)
        q[start : start + rows_per_chunk] = w.div_(s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scales[start : start + rows_per_chunk] = s
    return q, scales


class Int8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` with an int8 weight and float32 per-channel scales."""

    #: up to this many rows the int8 GEMV kernel is used; above it, dequantize + F.linear
    gemv_max_rows: int = 16

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32)) if bias else None
        self._scales_cast: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear | PackedLinear) -> Int8Linear:
        w = linear.weight  # a PackedLinear gives a dense copy
        q, scales = quantize_weight_int8(w)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=w.dtype)
        mod.weight = q.to(w.device)
        mod.scales = scales.to(w.device)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return mod

    def _scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._scales_cast.get(dtype)
        if s is None or s.device != self.scales.device:
            s = self._scales_cast[dtype] = self.scales.to(dtype)
        return s

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self._scales_for(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if x2.device.type == "cpu" and x2.dtype in _KERNEL_DTYPES and 0 < rows <= self.gemv_max_rows:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self._scales_for(x2.dtype))
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            # integers up to 127 are exact in bf16/f16: multiply by the int weights, scale the OUTPUT
            # columns (M x N multiplies instead of N x K)
            y = F.linear(x2, self.weight.to(x2.dtype)) * self._scales_for(x2.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def weight_nbytes(self) -> int:
        """Bytes of int8 weights + float32 scales (what a step that runs this layer reads)."""
        return self.weight.numel() * self.weight.element_size() + self.scales.numel() * self.scales.element_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_linears_int8(
    module: nn.Module, *, skip: Callable[[str, nn.Linear], bool] | None = None, min_features: int = 0
) -> int:
    """Replace every ``nn.Linear`` / ``layers.PackedLinear`` / ``layers.KernelLinear`` under ``module``
    (in place) by an :class:`Int8Linear`.

    ``skip(qualified_name, linear)`` keeps a layer in full precision when it returns True (e.g. a router
    whose top-k choice is sensitive, or an lm_head); layers with ``min(in, out) < min_features`` are kept
    too. Returns the number of layers replaced. The full-precision weights are freed layer by layer. A
    fused layer (q/k/v, gate/up: ``common.fused``) becomes one int8 layer: its scales are per output row,
    so they are the scales each projection would get on its own.
    """
    return replace_linears(
        module, Int8Linear.from_linear, skip, min_features, source=(nn.Linear, PackedLinear, KernelLinear)
    )


def int8_weight_bytes(module: nn.Module) -> int:
    """Bytes of int8 weights + scales held by the quantized layers of ``module``."""
    return sum(mod.weight_nbytes() for mod in module.modules() if isinstance(mod, Int8Linear))
