"""Sibling projections fused once, at load time, under their checkpoint names.

Layers that read the same input (an attention's q/k/v, a gated MLP's gate/up) run as ONE linear layer:
a decode step's matrix-vector product over the bigger weight runs closer to the memory bandwidth, and
it is one call instead of two or three. :func:`fused_linear` registers that layer on its parent module
together with two hooks, so that the fusion never shows outside the module:

- ``load_state_dict`` (a pre-hook, as gpt-fast's attention does it) concatenates the checkpoint's
  separate tensors (``q_proj.weight``, ``k_proj.weight``, ``v_proj.weight``) into the fused one
  (``qkv_proj.weight``) along the output rows; a part that is missing is reported under its own name;
- ``state_dict()`` (a post-hook) splits every fused tensor back into the checkpoint's names, whatever the
  fused layer has become since (packed for oneDNN, int8 with per-row scales, widened: their per-row
  tensors split by rows the same way).

So the module tree has one forward path, and a loaded model's ``state_dict()`` has exactly the keys of
the checkpoint it was loaded from. :func:`fuse_state_dict` does the concatenation on a whole state dict
in place before ``load_state_dict`` (each part freed as soon as it is copied: peak memory is the model
plus one fused layer), and :func:`checkpoint_names` maps fused parameter names to the stored ones (the
loader's per-tensor dtype choices are made on stored names).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Fusion:
    """``parent.<name>`` is the fused layer; ``parts`` name the checkpoint's layers, ``rows`` their
    output sizes, in the order their rows are stacked."""

    name: str
    parts: tuple[str, ...]
    rows: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return sum(self.rows)


def fused_linear(
    parent: nn.Module,
    name: str,
    parts: Sequence[str],
    in_features: int,
    rows: Sequence[int],
    bias: bool = False,
) -> nn.Linear:
    """Register on ``parent`` (as ``parent.<name>``) one ``nn.Linear`` whose checkpoint form is the
    separate layers ``parts`` (``parent.<part>``, ``rows[i]`` outputs each, the same input); returns it."""
    fusion = Fusion(name, tuple(parts), tuple(rows))
    layer = nn.Linear(in_features, fusion.out_features, bias=bias)
    parent.add_module(name, layer)
    fusions: list[Fusion] | None = parent.__dict__.get("_fusions")
    if fusions is None:
        fusions = parent.__dict__["_fusions"] = []
        parent._register_state_dict_hook(_split_hook)
        parent._register_load_state_dict_pre_hook(_fuse_hook, with_module=True)
    fusions.append(fusion)
    return layer


def fusions(module: nn.Module) -> list[Fusion]:
    """The fusions registered on ``module`` itself (not its children)."""
    return module.__dict__.get("_fusions", [])


def _fused_keys(module: nn.Module, fusion: Fusion) -> list[str]:
    """Local names (``weight``, ``bias``) the fused layer loads."""
    layer = getattr(module, fusion.name)
    return [k for k, v in layer._parameters.items() if v is not None]


def _fuse(
    module: nn.Module, state: MutableMapping[str, torch.Tensor], prefix: str, missing: list[str] | None
) -> None:
    for fusion in fusions(module):
        for local in _fused_keys(module, fusion):
            target = f"{prefix}{fusion.name}.{local}"
            if target in state:
                continue
            keys = [f"{prefix}{part}.{local}" for part in fusion.parts]
            if all(k in state for k in keys):
                tensors = []
                for k in keys:
                    tensors.append(state.pop(k))
                state[target] = torch.cat(tensors)
                del tensors
            elif missing is not None:
                missing.extend(k for k in keys if k not in state)


def _fuse_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # noqa: ANN001, ARG001 - torch's signature
    _fuse(module, state_dict, prefix, missing_keys)


def _split_hook(module, state_dict, prefix, local_metadata):  # noqa: ANN001, ARG001 - torch's signature
    for fusion in fusions(module):
        head = f"{prefix}{fusion.name}."
        for key in [k for k in state_dict if k.startswith(head)]:
            tensor = state_dict[key]
            if tensor.dim() == 0 or tensor.shape[0] != fusion.out_features:
                continue
            local = key[len(head) :]
            del state_dict[key]
            for part, piece in zip(fusion.parts, tensor.split(fusion.rows), strict=True):
                state_dict[f"{prefix}{part}.{local}"] = piece.clone()


def fuse_state_dict(net: nn.Module, state: MutableMapping[str, torch.Tensor]) -> None:
    """Concatenate, in place, the separate checkpoint tensors of every fused layer of ``net`` into the
    fused one (what ``load_state_dict``'s hook would do, but on the caller's dict: each part is dropped as
    soon as it is copied). Parts that are missing stay missing (the strict load names them)."""
    for name, module in net.named_modules():
        if fusions(module):
            _fuse(module, state, f"{name}." if name else "", None)


def checkpoint_names(net: nn.Module) -> dict[str, list[str]]:
    """``{fused parameter name: [the checkpoint names it is stored under]}`` for every fused layer."""
    out: dict[str, list[str]] = {}
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        for fusion in fusions(module):
            for local in _fused_keys(module, fusion):
                out[f"{prefix}{fusion.name}.{local}"] = [f"{prefix}{p}.{local}" for p in fusion.parts]
    return out
