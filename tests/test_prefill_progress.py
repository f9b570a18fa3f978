"""The prefill half of the model protocol, checked on every registered family (tiny checkpoints):

- ``prefill`` calls its ``between_layers`` callback at every layer boundary of every layer stack it runs
  (vision encoders and language model), and never inside a layer: a family that forgets it fails here
  (the engine's latency bound during a long prefill rests on it);
- a decode step of another sequence run inside the callback (what the engine does) changes nothing:
  the prefill gives the same logits, the other sequence the same tokens;
- a callback that raises (a cancelled request) leaves the model as it was.

A family is found through ``models.MODEL_KINDS``; its tiny checkpoint comes from
``deepseek_ocr_server.testing.<package>.build_tiny_checkpoint`` (the package that holds the model class).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepseek_ocr_server.config import KIND_DEFAULTS
from deepseek_ocr_server.models import MODEL_KINDS, load_model
from deepseek_ocr_server.models.base import ModelFiles, OcrModel, VisionSettings

#: kinds without layers (the deterministic test model)
LAYERLESS = {"fake"}
KINDS = [k for k in MODEL_KINDS if k not in LAYERLESS]
#: session fixtures that already hold a kind's tiny model in float32 (others are built here)
SHARED = {
    "deepseek-ocr": "deepseek_model_f32",
    "deepseek-ocr-2": "deepseek2_model",
    "paddleocr-vl": "paddle_model",
    "glm-ocr": "glm_model",
}


def _img(seed: int, w: int = 150, h: int = 90) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _build(kind: str, root: Path) -> OcrModel:
    package = MODEL_KINDS[kind].partition(":")[0].split(".")[-2]  # deepseek_ocr_server.models.<package>.model
    builder = importlib.import_module(f"deepseek_ocr_server.testing.{package}")
    ckpt = builder.build_tiny_checkpoint(root)
    return load_model(kind, ModelFiles.from_dir(ckpt), device="cpu", dtype=torch.float32)


@pytest.fixture(params=KINDS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> OcrModel:
    kind = request.param
    if kind in SHARED:
        return request.getfixturevalue(SHARED[kind])
    return _build(kind, tmp_path_factory.mktemp(f"{kind}-tiny"))


def _prompts(model: OcrModel) -> tuple[Any, Any]:
    size = KIND_DEFAULTS.get(model.kind, {}).get("image_size", 512)  # one small view the family accepts
    vision = VisionSettings(base_size=size, image_size=size, crop_mode=False)
    first = model.prepare("Read the text.", [_img(1)], vision)
    second = model.prepare("Read this one.", [_img(2, 120, 120)], vision)
    return first, second


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


def test_prefill_calls_back_at_every_layer_boundary(tiny: OcrModel) -> None:
    model = tiny
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
    _, second = _prompts(model)
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


def test_decode_inside_the_callback_changes_nothing(tiny: OcrModel) -> None:
    model = tiny
    first, second = _prompts(model)
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
