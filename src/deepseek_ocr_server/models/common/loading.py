"""What every family's ``load`` does, in one place: tokenizer, stop ids, strict weights, inference form.

:func:`load_net` builds the network on the ``meta`` device, checks the checkpoint strictly against the
network's ``state_dict()`` names (the checkpoint's own names: fused layers show their stored parts), reads
each tensor once in the dtype of its phase (``layers.storage_dtypes``), fuses sibling projections in place
(``fused.fuse_state_dict``), loads strictly with ``assign=True`` and turns the result into its inference
form (``layers.prepare_for_inference``: int8 when asked, the precision plan's widening layers, oneDNN
packing). :func:`load_tokenizer`, :func:`stop_token_ids` and :func:`chat_template` are the other steps
the families share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from ..base import ModelFiles, ModelLoadError
from ..layers import prepare_for_inference, storage_dtypes
from ..precision import Precision
from ..weights import load_checkpoint
from .fused import fuse_state_dict


def load_tokenizer(path: Path) -> Tokenizer:
    """``tokenizer.json`` as a :class:`tokenizers.Tokenizer`; :class:`ModelLoadError` when absent or bad."""
    if not Path(path).is_file():
        raise ModelLoadError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a load error
        raise ModelLoadError(f"cannot load tokenizer {path}: {exc}") from exc


def stop_token_ids(config_ids: Iterable[int], files: ModelFiles) -> frozenset[int]:
    """The ids that end generation: ``generation_config.json``'s ``eos_token_id`` (an id or a list) when
    the checkpoint has one, else the model config's. This is how transformers' ``generate`` decides (the
    model config only seeds a missing generation config); every reference checkpoint has both, agreeing."""
    gen = files.read_json("generation_config.json") or {}
    eos = gen.get("eos_token_id")
    if isinstance(eos, int):
        return frozenset({eos})
    if isinstance(eos, list) and eos:
        return frozenset(int(x) for x in eos)
    return frozenset(int(x) for x in config_ids)


def chat_template(files: ModelFiles) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` string, else None."""
    path = files.extra("chat_template.jinja")
    if path is not None:
        return path.read_text(encoding="utf-8")
    tok_cfg = files.read_json("tokenizer_config.json") or {}
    template = tok_cfg.get("chat_template")
    return template if isinstance(template, str) else None


def load_net(
    build: Callable[[], nn.Module],
    files: ModelFiles,
    precision: Precision,
    quantize: str | None,
    device: torch.device,
    *,
    model: str,
    is_vision: Callable[[str], bool],
    renames: Iterable[tuple[re.Pattern[str], str]] = (),
    ignored: Iterable[re.Pattern[str]] = (),
    tied: Mapping[str, str] | None = None,
    unread: re.Pattern[str] | None = None,
    prune: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """The network ``build()`` makes, loaded strictly from ``files.weights`` and ready for inference.

    ``model`` names the layout in errors; ``is_vision(name)`` says which tensors and layers are the vision
    side (their own dtype, no int8: the family spec's ``is_vision``); ``renames``, ``ignored`` and ``tied`` are
    ``weights.match_layout``'s; ``unread`` matches keys that are checked (name and shape) but not read,
    and ``prune(net)`` then drops the modules that held them before the strict ``load_state_dict``."""
    with torch.device("meta"):
        net = build()
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    stored, overrides = storage_dtypes(net, precision, is_vision)  # each tensor in its phase's dtype
    state = load_checkpoint(
        files.weights,
        expected,
        stored,
        model=model,
        renames=renames,
        ignored=ignored,
        tied=tied,
        overrides=overrides,
        device=device,
        unread=unread,
    )
    if prune is not None:
        prune(net)
    fuse_state_dict(net, state)  # q/k/v and gate/up into their fused layers, each part freed at once
    net.load_state_dict(state, strict=True, assign=True)
    del state  # the net holds the only reference: a replaced layer's weight is freed at once
    net.eval().requires_grad_(False)
    # int8 (decoder linears + lm_head) when asked; widening layers of the plan; oneDNN packing
    prepare_for_inference(net, precision, quantize, is_vision)
    return net
