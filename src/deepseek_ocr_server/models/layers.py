"""Linear layers with a separate decode storage dtype, shared by the decoders of both model families.

On CPU, torch's float16 matrix-vector kernel reads weights about twice as fast as the bfloat16 one
(PERF-NOTES), and decode steps are bound by reading the weights. So a bfloat16 model on CPU stores its
decoder linears and lm_head in float16 (exact for weights of ordinary magnitude: float16 has more
mantissa bits than bfloat16) and runs decode steps through :func:`decode_linear` (float16 GEMV);
prefill goes through :func:`linear`, which converts such a weight back to the activation dtype on the
fly (compute-bound GEMMs stay in bfloat16). float32 models are untouched; int8-quantized layers
(``quant.Int8Linear``) and any other module run as they are.

Which tensors get the decode storage: :func:`is_decoder_linear` (checkpoint key names, the same in
both families). Loaders read those tensors straight into float16 (:func:`decode_storage_dtype` tells
whether to), so no second copy of the weights is ever alive; :func:`set_decode_storage` switches an
already loaded module at run time (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

#: storage dtype of decoder linears for bandwidth-bound decode steps of a bfloat16 model on CPU
DECODE_STORAGE = torch.float16
#: float16 GEMM cost grows with the rows (it is no faster than bfloat16 at 2 rows, 4x slower at 8, 20x
#: slower at 16): decode steps of more rows use a layer's ``batch_weight`` (a copy in the activation
#: dtype, see :func:`set_decode_storage`) when it has one
F16_MAX_ROWS = 2


def decode_storage_dtype(device: torch.device | str, dtype: torch.dtype, quantize: str | None) -> torch.dtype | None:
    """The decode storage dtype a model loaded with these settings uses by default (None: its own)."""
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16 and quantize is None:
        return DECODE_STORAGE
    return None


def decode_storage_overrides(
    keys: Iterable[str], device: torch.device | str, dtype: torch.dtype, quantize: str | None
) -> dict[str, torch.dtype] | None:
    """Per-key dtype overrides for the loader (``weights.load_checkpoint``): the decoder linears read
    straight into the decode storage dtype (no transient second copy), or None when it is the model's."""
    storage = decode_storage_dtype(device, dtype, quantize)
    return None if storage is None else {k: storage for k in keys if is_decoder_linear(k)}


def is_decoder_linear(name: str) -> bool:
    """Checkpoint keys of the weights stored in the decode dtype: ``lm_head.weight`` and every
    ``model.layers.{L}.….{x}_proj.weight`` (attention q/k/v/o, dense MLP, routed and shared experts).
    Routers (``mlp.gate.weight``), norms, embeddings, biases and the vision side keep the model dtype."""
    return name == "lm_head.weight" or (name.startswith("model.layers.") and name.endswith("_proj.weight"))


def fits(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` converted to ``dtype``, or None when a value does not fit (overflows to +-inf)."""
    c = t if t.dtype == dtype else t.to(dtype)
    return c if c is t or bool(torch.isfinite(c).all()) else None


def _bias(mod: nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    return None if mod.bias is None else mod.bias.to(dtype)


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a linear layer to many rows (prefill). A weight stored in another dtype (the decode
    storage) is used through its ``batch_weight`` copy when it has one, else converted to the activation
    dtype on the fly."""
    if type(mod) is nn.Linear and mod.weight.dtype != x.dtype:
        wb = getattr(mod, "batch_weight", None)
        w = wb if wb is not None and wb.dtype == x.dtype else mod.weight.to(x.dtype)
        return F.linear(x, w, _bias(mod, x.dtype))
    return mod(x)


def decode_linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a linear layer in a decode step (one row per sequence) in its weight's storage dtype.

    An overflowing float16 result (or input) is recomputed in the activation dtype. Layers in the
    activation dtype and int8-quantized ones run as they are."""
    if type(mod) is not nn.Linear or mod.weight.dtype == x.dtype:
        return mod(x)
    if x.shape[0] > F16_MAX_ROWS and getattr(mod, "batch_weight", None) is not None:
        return linear(mod, x)
    w = mod.weight
    y = F.linear(x.to(w.dtype), w, _bias(mod, w.dtype))
    if not bool(torch.isfinite(y).all()):
        return linear(mod, x)
    return y.to(x.dtype)


def decoder_linears(net: nn.Module) -> Iterable[tuple[str, nn.Linear]]:
    """``(key prefix, layer)`` of the plain ``nn.Linear`` layers of ``net`` whose weight is a decoder
    linear (:func:`is_decoder_linear`)."""
    for name, m in net.named_modules():
        if type(m) is nn.Linear and is_decoder_linear(f"{name}.weight"):
            yield name, m


def set_decode_storage(
    net: nn.Module, dtype: torch.dtype, model_dtype: torch.dtype, batch_copies: Callable[[str], bool] | None = None
) -> int:
    """Store the decoder linears of ``net`` (a model whose state-dict keys are the checkpoint's) in
    ``dtype``, layer by layer (peak memory: one layer twice). A weight that does not fit ``dtype``
    stays as it is. Layers whose key prefix ``batch_copies`` selects also keep a ``batch_weight`` copy
    in ``model_dtype`` for batched decode steps and prefill (:func:`decode_linear`); ``dtype ==
    model_dtype`` drops those copies. Returns the number of layers now stored in ``dtype``."""
    n = 0
    for name, m in decoder_linears(net):
        if m.weight.dtype != dtype:
            w = fits(m.weight.detach(), dtype)
            if w is None:
                continue
            m.weight = nn.Parameter(w, requires_grad=False)
        n += 1
        keep = dtype != model_dtype and batch_copies is not None and batch_copies(name)
        m.batch_weight = m.weight.detach().to(model_dtype) if keep else None
    return n

