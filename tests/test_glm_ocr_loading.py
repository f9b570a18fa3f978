"""Strict loading of the original GLM-OCR checkpoint layout, the full-size module tree, the MTP layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from deepseek_ocr_server.models import load_model
from deepseek_ocr_server.models.base import ModelFiles, ModelLoadError
from deepseek_ocr_server.models.glm_ocr.config import GlmOcrConfig
from deepseek_ocr_server.models.glm_ocr.model import GlmOcrModel, GlmOcrNet, mtp_pattern
from deepseek_ocr_server.models.quant import Int8Linear
from deepseek_ocr_server.testing.glm_ocr import build_tiny_checkpoint, checkpoint_shapes, full_config

MTP = "model.language_model.layers.2."  # the tiny checkpoint's MTP layer (after its 2 decoder layers)


def _load(d: Path, **kw) -> GlmOcrModel:
    return GlmOcrModel.load(ModelFiles.from_dir(d), dtype=torch.float32, **kw)


def test_full_size_module_tree_consumes_exactly_the_checkpoint_keys() -> None:
    """The real config's module tree, built on the meta device, has exactly the published 526 keys and
    shapes (1,325,258,240 parameters: vision 347 tensors, decoder + heads 163, MTP layer 16)."""
    cfg = full_config()
    with torch.device("meta"):
        net = GlmOcrNet(GlmOcrConfig.from_dict(cfg))
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    published = checkpoint_shapes(cfg)
    assert ours == published
    assert len(ours) == 526
    assert sum(torch.Size(s).numel() for s in ours.values()) == 1_325_258_240
    assert sum(k.startswith("model.visual.") for k in ours) == 347
    mtp = mtp_pattern(GlmOcrConfig.from_dict(cfg))
    assert sum(bool(mtp.search(k)) for k in ours) == 16
    assert {k for k in ours if mtp.search(k)} == {
        k for k in ours if k.startswith("model.language_model.layers.16.")
    }


def test_mtp_layer_checked_but_not_kept(glm_ckpt: Path, glm_model: GlmOcrModel) -> None:
    with safe_open(str(glm_ckpt / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        lm_head = f.get_tensor("lm_head.weight")
    assert len(keys) == 78 and sum(k.startswith(MTP) for k in keys) == 16
    state = glm_model.net.state_dict()
    assert set(state) == {k for k in keys if not k.startswith(MTP)}
    assert len(glm_model.net.model.language_model.layers) == 2
    assert torch.equal(glm_model.net.lm_head.weight, lm_head)
    assert not torch.equal(
        glm_model.net.lm_head.weight, glm_model.net.model.language_model.embed_tokens.weight
    )
    assert glm_model.eos_token_ids == frozenset({97, 104})  # <|endoftext|>, <|user|>
    assert glm_model.kind == "glm-ocr"


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            {"omit": (MTP + "eh_proj.weight",)},
            r"missing tensors: model\.language_model\.layers\.2\.eh_proj\.weight",
        ),
        (
            {"omit": ("model.visual.blocks.1.attn.q_norm.weight",)},
            r"missing tensors: model\.visual\.blocks\.1\.",
        ),
        (
            {"extra": {"model.language_model.layers.3.enorm.weight": (64,)}},
            r"unexpected tensors: .*layers\.3\.enorm",
        ),
        (
            {"reshape": {MTP + "shared_head.head.weight": (100, 64)}},
            r"wrong shapes: model\.language_model\.layers\.2\.shared_head\.head\.weight \(checkpoint \[100, 64\]",
        ),
        ({"omit": ("lm_head.weight",)}, r"missing tensors: lm_head\.weight"),
    ],
)
def test_strict_loading_names_every_problem(tmp_path: Path, corrupt: dict, message: str) -> None:
    d = build_tiny_checkpoint(tmp_path, **corrupt)
    with pytest.raises(ModelLoadError, match=message):
        _load(d)


def test_bad_config_is_a_load_error(tmp_path: Path, glm_ckpt: Path) -> None:
    d = tmp_path / "c"
    shutil.copytree(glm_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [4, 6, 5]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mrope_section"):
        _load(d)
    del cfg["text_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="text_config"):
        _load(d)


def test_registry_bf16_packed_and_int8(glm_ckpt: Path, glm_model: GlmOcrModel) -> None:
    m = load_model("glm-ocr", ModelFiles.from_dir(glm_ckpt), dtype=torch.bfloat16)
    assert isinstance(m, GlmOcrModel)
    assert {p.dtype for p in m.net.parameters()} == {torch.bfloat16}
    assert m.packed_layers > 0
    q = load_model("glm-ocr", ModelFiles.from_dir(glm_ckpt), dtype=torch.float32, quantize="int8")
    int8 = [n for n, mod in q.net.named_modules() if isinstance(mod, Int8Linear)]
    assert "lm_head" in int8 and all(not n.startswith("model.visual.") for n in int8)
    prepared = q.prepare("Text Recognition:", [])
    logits, cache = q.prefill(prepared, 2)
    assert q.decode([int(logits.argmax())], [cache]).shape == (1, q.config.vocab_size)
    with pytest.raises(ModelLoadError, match="quantize"):
        load_model("glm-ocr", ModelFiles.from_dir(glm_ckpt), quantize="int4")


def test_packed_equals_plain_layers(glm_model: GlmOcrModel) -> None:
    prepared = glm_model.prepare("Text Recognition:", [])
    packed, _ = glm_model.prefill(prepared, 1)
    glm_model.set_packed(False)
    try:
        plain, _ = glm_model.prefill(prepared, 1)
    finally:
        glm_model.set_packed(True)
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=0)
