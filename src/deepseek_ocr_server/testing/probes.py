"""Measuring probes for benchmarks and tests, kept out of the serving code: they observe a model from
outside (wrapping a method, forward hooks) instead of the model keeping counters for them.

- :func:`timed_prefill`: a prefill split into its vision part and the rest (``vision_s``, ``prefill_s``);
- :func:`decode_weight_bytes`: the weight bytes one ``decode`` call read -- every linear layer that ran,
  once (a dense layer once per step whatever the batch; of a mixture-of-experts layer, the experts some
  row selected), plus router matrices; embeddings (a row lookup) and norms are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models import cpukernels
from ..models.base import OcrModel, Prepared, SequenceCache


@dataclass
class PrefillTimes:
    logits: torch.Tensor
    cache: SequenceCache
    vision_s: float  # the vision encoder(s) and projector
    prefill_s: float  # the rest: embedding the prompt and the language model's prefill


def _vision_entry(model: OcrModel) -> tuple[Any, str]:
    """(object, attribute) of the method that runs a family's vision tower on one prefill."""
    if hasattr(model, "encode_images"):  # PaddleOCR-VL, GLM-OCR: all images at once
        return model, "encode_images"
    net = getattr(model, "net", None)
    if net is not None and hasattr(net, "encode_image"):  # the DeepSeek-OCR families: one image at a time
        return net, "encode_image"
    raise TypeError(f"{type(model).__name__}: no vision entry point to time")


def timed_prefill(model: OcrModel, prepared: Prepared, max_new_tokens: int) -> PrefillTimes:
    """``model.prefill`` with the time spent in the vision tower measured apart."""
    owner, name = _vision_entry(model)
    inner: Callable[..., torch.Tensor] = getattr(owner, name)
    spent = [0.0]

    def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    setattr(owner, name, timed)  # an instance attribute shadows the method for this call only
    try:
        t0 = time.perf_counter()
        logits, cache = model.prefill(prepared, max_new_tokens)
        total = time.perf_counter() - t0
    finally:
        delattr(owner, name)
    return PrefillTimes(logits, cache, spent[0], total - spent[0])


def _linear_bytes(m: nn.Module) -> int:
    """Bytes of the weight matrix ``m`` owns itself (0 for containers, norms, embeddings)."""
    if isinstance(m, nn.Embedding):
        return 0
    if type(m) is nn.Linear:
        return m.weight.numel() * m.weight.element_size()
    nbytes = getattr(m, "weight_nbytes", None)  # packed and int8 layers say it themselves
    if callable(nbytes):
        return int(nbytes())
    w = m._parameters.get("weight")  # a bare matrix parameter, e.g. a mixture-of-experts router
    return w.numel() * w.element_size() if w is not None and w.dim() == 2 else 0


def decode_weight_bytes(
    model: OcrModel, tokens: list[int], caches: list[SequenceCache]
) -> tuple[torch.Tensor, int]:
    """``model.decode(tokens, caches)`` and the weight bytes that call read (see the module docstring)."""
    ran: dict[int, int] = {}
    handles = []

    def hook(n: int) -> Callable[..., None]:
        def seen(mod: nn.Module, _args: object) -> None:  # returns None: the inputs stay as they are
            ran[id(mod)] = n

        return seen

    for m in model.net.modules():  # type: ignore[attr-defined]
        nbytes = _linear_bytes(m)
        if nbytes:
            handles.append(m.register_forward_pre_hook(hook(nbytes)))
    # the package's grouped expert kernel runs a step's experts in one call, without their modules'
    # forward (no hooks would fire): this step runs them layer by layer (same experts, same bytes)
    kernels_on, cpukernels.enabled = cpukernels.enabled, False
    try:
        logits = model.decode(tokens, caches)
    finally:
        cpukernels.enabled = kernels_on
        for h in handles:
            h.remove()
    return logits, sum(ran.values())
