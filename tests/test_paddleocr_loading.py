"""Strict loading of the original PaddleOCR-VL checkpoint layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_ocr_server.models import load_model
from deepseek_ocr_server.models.base import ModelFiles, ModelLoadError
from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel
from deepseek_ocr_server.testing.paddleocr_vl import build_tiny_checkpoint


def _load(d: Path, **kw) -> PaddleOcrVlModel:
    return PaddleOcrVlModel.load(ModelFiles.from_dir(d), dtype=torch.float32, **kw)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_missing_key_is_named(tmp_path: Path) -> None:
    d = build_tiny_checkpoint(tmp_path, omit=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ModelLoadError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(d)


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    d = build_tiny_checkpoint(tmp_path, extra={"model.layers.0.self_attn.q_proj.bias": (128,)})
    with pytest.raises(ModelLoadError, match=r"unexpected keys: model\.layers\.0\.self_attn\.q_proj\.bias"):
        _load(d)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    d = build_tiny_checkpoint(tmp_path, reshape={"mlp_AR.linear_2.weight": (64, 128)})
    with pytest.raises(ModelLoadError, match=r"mis-shaped keys: mlp_AR\.linear_2\.weight: file \(64, 128\)"):
        _load(d)


def test_unused_keys_are_ignored_and_lm_head_untied(
    paddle_ckpt: Path, paddle_model: PaddleOcrVlModel
) -> None:
    t = _tensors(paddle_ckpt)
    assert "visual.vision_model.embeddings.packing_position_embedding.weight" in t
    assert sum(k.startswith("visual.vision_model.head.") for k in t) == 11
    assert len(t) == 76
    net = paddle_model.net
    assert torch.equal(net.lm_head.weight, t["lm_head.weight"])
    assert not torch.equal(net.lm_head.weight, net.model.embed_tokens.weight)
    assert paddle_model.eos_token_ids == frozenset({2})
    assert paddle_model.kind == "paddleocr-vl"


def test_missing_lm_head_falls_back_to_embeddings(tmp_path: Path) -> None:
    d = build_tiny_checkpoint(tmp_path, omit=("lm_head.weight",))
    m = _load(d)
    assert torch.equal(m.net.lm_head.weight, m.net.model.embed_tokens.weight)


def test_sharded_checkpoint_and_registry(
    paddle_ckpt: Path, paddle_model: PaddleOcrVlModel, tmp_path: Path
) -> None:
    t = _tensors(paddle_ckpt)
    keys = sorted(t)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in halves.items():
        save_file({k: t[k] for k in ks}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    for side in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        shutil.copy(paddle_ckpt / side, tmp_path / side)
    m = load_model("paddleocr-vl", ModelFiles.from_dir(tmp_path), dtype=torch.float32)
    assert isinstance(m, PaddleOcrVlModel)
    a, b = m.net.state_dict(), paddle_model.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_key_names_accepted(
    paddle_ckpt: Path, paddle_model: PaddleOcrVlModel, tmp_path: Path
) -> None:
    shutil.copytree(paddle_ckpt, tmp_path / "c")
    renamed = {}
    for k, v in _tensors(paddle_ckpt).items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("mlp_AR."):
            k = "model.projector." + k[len("mlp_AR.") :]
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        renamed[k] = v
    save_file(renamed, str(tmp_path / "c" / "model.safetensors"), metadata={"format": "pt"})
    m = _load(tmp_path / "c")
    assert torch.equal(m.net.mlp_AR.linear_1.weight, paddle_model.net.mlp_AR.linear_1.weight)


def test_dtype_conversion_once_and_quantize_rejected(paddle_ckpt: Path) -> None:
    m = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=torch.bfloat16)
    assert {p.dtype for p in m.net.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelLoadError, match="quantize"):
        _load(paddle_ckpt, quantize="int4")


def test_bad_config_is_a_load_error(paddle_ckpt: Path, tmp_path: Path) -> None:
    shutil.copytree(paddle_ckpt, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["rope_scaling"]["mrope_section"] = [4, 6, 4]
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mrope_section"):
        _load(tmp_path / "c")
