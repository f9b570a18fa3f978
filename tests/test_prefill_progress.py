"""The prefill half of the model protocol, checked on every registered family (tiny checkpoints):

- ``prefill`` calls its ``between_layers`` callback at every layer boundary of every layer stack it runs
  (vision encoders and language model), and never inside a layer: a family that forgets it fails here
  (the engine's latency bound during a long prefill rests on it);
- a decode step of another sequence run inside the callback (what the engine does) changes nothing:
  the prefill gives the same logits, the other sequence the same tokens;
- a callback that raises (a cancelled request) leaves the model as it was.

Every family of the registry (``models/<family>/spec.py``) is checked, on the tiny checkpoint its spec
builds (``FamilySpec.test_checkpoint``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepseek_ocr_server.models import load_model
from deepseek_ocr_server.models.base import ModelFiles, OcrModel
from deepseek_ocr_server.models.registry import families

#: kinds without layers (the deterministic test model)
LAYERLESS = {"fake"}
KINDS = [k for k, spec in families().items() if spec.test_checkpoint and k not in LAYERLESS]
#: session fixtures that already hold a kind's tiny model in float32 (others are built here)
SHARED = {
    "deepseek-ocr": "deepseek_model_f32",
    "deepseek-ocr-2": "deepseek2_model",
    "paddleocr-vl": "paddle_model",
    "glm-ocr": "glm_model",
}


def _img(seed: int, w: int = 150, h: int = 90) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(params=KINDS)
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[OcrModel, Any, Any]:
    """(model, first prepared request, second prepared request) of one family."""
    kind = request.param
    spec = families()[kind]
    if kind in SHARED:
        model = request.getfixturevalue(SHARED[kind])
    else:
        ckpt = spec.build_test_checkpoint(tmp_path_factory.mktemp(f"{kind}-tiny"))
        model = load_model(kind, ModelFiles.from_dir(ckpt), device="cpu", dtype=torch.float32)
    size = spec.defaults.get("image_size", 512)  # one small view the family accepts
    options = {"base_size": size, "image_size": size, "crop_mode": False}
    first = model.prepare("Read the text.", [_img(1)], options)
    second = model.prepare("Read this one.", [_img(2, 120, 120)], options)
    return model, first, second


def _layer_stacks(model: OcrModel) -> list[tuple[str, nn.ModuleList]]:
    """Every ``ModuleList`` whose entries are transformer layers (each holds an attention module)."""
    out = []
    for name, mod in model.net.named_modules():  # type: ignore[attr-defined]
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod)
            and all(
                any(
                    "attn" in sub_name.lower() or "attention" in type(sub).__name__.lower()
                    for sub_name, sub in layer.named_modules()
                )
                for layer in mod
            )
        ):
            out.append((name, mod))
    return out


def test_prefill_calls_back_at_every_layer_boundary(tiny: tuple[OcrModel, Any, Any]) -> None:
    model, _, second = tiny
    stacks = _layer_stacks(model)
    assert stacks, f"{model.kind}: no layer stacks found"
    events: list[
        tuple[str, int] | None
    ] = []  # (stack, layer) when a module of that layer runs; None: callback
    handles = []
    for name, stack in stacks:
        for i, layer in enumerate(stack):
            for sub in layer.modules():
                handles.append(sub.register_forward_pre_hook(lambda *_, key=(name, i): events.append(key)))
    try:
        _, cache = model.prefill(second, 2, lambda: events.append(None))
    finally:
        for h in handles:
            h.remove()
    cache.release()

    boundaries: dict[str, int] = {}
    current: tuple[str, int] | None = None
    called = False  # the callback ran since the current layer's last module
    for ev in events:
        if ev is None:
            called = True
            continue
        if ev == current:
            assert not called, f"{model.kind}: between_layers called inside layer {ev[1]} of {ev[0]}"
            continue
        if current is not None and current[0] == ev[0]:
            assert called, (
                f"{model.kind}: no between_layers call between layers {current[1]} and {ev[1]} of {ev[0]}"
            )
            boundaries[ev[0]] = boundaries.get(ev[0], 0) + 1
        current, called = ev, False
    # the test means something only if the prefill crossed boundaries in the vision and the language stacks
    assert len(boundaries) >= 2, f"{model.kind}: layer boundaries seen only in {boundaries}"


def _greedy(model: OcrModel, prepared: Any, n: int) -> list[int]:
    logits, cache = model.prefill(prepared, n + 1)
    out = []
    for _ in range(n):
        out.append(int(torch.argmax(logits)))
        logits = model.decode([out[-1]], [cache])[0]
    cache.release()
    return out


class _Stop(Exception):
    pass


def test_decode_inside_the_callback_changes_nothing(tiny: tuple[OcrModel, Any, Any]) -> None:
    model, first, second = tiny
    want_tokens = _greedy(model, first, 6)
    want_logits, c = model.prefill(second, 2)
    c.release()

    logits, cache = model.prefill(first, 7)
    other = [int(torch.argmax(logits))]
    calls = 0

    def step() -> None:  # one decode step of `first` in the middle of `second`'s prefill
        nonlocal logits, calls
        calls += 1
        if len(other) < 6:
            logits = model.decode([other[-1]], [cache])[0]
            other.append(int(torch.argmax(logits)))

    got_logits, c2 = model.prefill(second, 2, step)
    assert calls > 0
    assert torch.equal(got_logits, want_logits)
    while len(other) < 6:
        logits = model.decode([other[-1]], [cache])[0]
        other.append(int(torch.argmax(logits)))
    assert other == want_tokens
    cache.release()
    c2.release()

    # a callback that raises (the engine's way to drop a cancelled request) abandons the prefill and
    # leaves nothing behind: the next prefill gives the same logits
    calls = 0

    def stop_at_third() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise _Stop

    with pytest.raises(_Stop):
        model.prefill(second, 2, stop_at_third)
    assert calls == 3  # nothing ran the callback again after it raised
    again, c3 = model.prefill(second, 2)
    c3.release()
    assert torch.equal(again, want_logits)
