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
    with pytest.raises(ModelLoadError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(d)


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    d = build_tiny_checkpoint(tmp_path, extra={"model.layers.0.self_attn.q_proj.bias": (128,)})
    with pytest.raises(
        ModelLoadError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias"
    ):
        _load(d)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    d = build_tiny_checkpoint(tmp_path, reshape={"mlp_AR.linear_2.weight": (64, 128)})
    with pytest.raises(
        ModelLoadError,
        match=r"wrong shapes: mlp_AR\.linear_2\.weight \(checkpoint \[64, 128\], expected \[64, 256\]\)",
    ):
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
    assert all(mod.weight.dtype == torch.bfloat16 for mod in m.net.modules() if hasattr(mod, "in_features"))
    m.set_packed(False)
    assert m.packed_layers == 0
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


def test_tensor_under_both_names_is_an_error(paddle_ckpt: Path, tmp_path: Path) -> None:
    shutil.copytree(paddle_ckpt, tmp_path / "c")
    t = _tensors(paddle_ckpt)
    t["model.projector.linear_1.bias"] = t["mlp_AR.linear_1.bias"].clone()
    save_file(t, str(tmp_path / "c" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"stored twice.*mlp_AR\.linear_1\.bias"):
        _load(tmp_path / "c")


def test_unsupported_vision_activation_rejected(paddle_ckpt: Path, tmp_path: Path) -> None:
    shutil.copytree(paddle_ckpt, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "relu"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="hidden_act"):
        _load(tmp_path / "c")


# The real PaddleOCR-VL v1.0 config.json values, written out here on purpose.
REAL_CONFIG = {
    "vocab_size": 103424,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 18,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "max_position_embeddings": 131072,
    "rope_theta": 500000,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "tie_word_embeddings": False,
    "use_bias": False,
    "image_token_id": 100295,
    "vision_start_token_id": 101305,
    "vision_end_token_id": 101306,
    "video_token_id": 101307,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_channels": 3,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


def test_real_config_module_has_the_608_used_tensors() -> None:
    from deepseek_ocr_server.models.paddleocr_vl.config import PaddleOcrVlConfig
    from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlNet

    cfg = PaddleOcrVlConfig.from_dict(REAL_CONFIG)
    with torch.device("meta"):
        net = PaddleOcrVlNet(cfg)
    state = net.state_dict()
    assert len(state) == 608
    assert sum(v.numel() for v in state.values()) == 905_601_648
    assert state["model.layers.17.self_attn.q_proj.weight"].shape == (2048, 1024)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (256, 1024)
    assert state["mlp_AR.linear_1.weight"].shape == (4608, 4608)
    assert state["mlp_AR.linear_2.weight"].shape == (1024, 4608)
    assert state["visual.vision_model.embeddings.position_embedding.weight"].shape == (729, 1152)
    assert state["visual.vision_model.embeddings.patch_embedding.weight"].shape == (1152, 3, 14, 14)
    assert state["visual.vision_model.encoder.layers.26.mlp.fc1.weight"].shape == (4304, 1152)
    assert state["lm_head.weight"].shape == (103424, 1024)
    assert not any("packing_position_embedding" in k or ".head." in k for k in state)


def test_int8_load_decodes(paddle_ckpt: Path) -> None:
    from deepseek_ocr_server.models.quant import Int8Linear

    m = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=torch.bfloat16, quantize="int8")
    assert isinstance(m.net.model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(m.net.lm_head, Int8Linear)
    assert not isinstance(m.net.mlp_AR.linear_1, Int8Linear)
    # the rest (vision tower, projector) is packed where oneDNN runs bf16; no int8 layer is
    assert not any(type(x).__name__ == "PackedLinear" for x in m.net.model.modules())
    prepared = m.prepare("OCR:", [])
    logits, cache = m.prefill(prepared, 2)
    step = m.decode([int(torch.argmax(logits))], [cache])
    assert step.shape == (1, m.config.vocab_size) and torch.isfinite(step).all()


def test_weight_outside_float16_range_kept_exactly(tmp_path: Path) -> None:
    d = build_tiny_checkpoint(tmp_path)
    t = _tensors(d)
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # representable in bf16, not in f16
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    m = PaddleOcrVlModel.load(ModelFiles.from_dir(d), dtype=torch.bfloat16)
    want = t["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    got = m.net.model.layers[0].mlp.state_dict()["up_proj.weight"]  # the checkpoint's name, fused or not
    assert torch.equal(got, want) and want[0, 0] == 1e6
    logits, cache = m.prefill(m.prepare("OCR:", []), 2)
    assert torch.isfinite(m.decode([int(torch.argmax(logits))], [cache])).all()
