"""Strict loading of the original DeepSeek-OCR layout, config parsing, tokenizer-derived ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_ocr_server.models import model_class
from deepseek_ocr_server.models.base import ModelFiles, ModelLoadError
from deepseek_ocr_server.models.common.fused import checkpoint_names
from deepseek_ocr_server.models.deepseek_ocr.config import DeepseekOcrConfig
from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrForCausalLM, DeepseekOcrModel
from deepseek_ocr_server.testing.deepseek_ocr import build_tiny_checkpoint, full_config, original_shapes

WEIGHTS = "model-00001-of-000001.safetensors"


def _variant(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS))
    return dst


def _load(d: Path, **kw) -> DeepseekOcrModel:
    return DeepseekOcrModel.load(ModelFiles.from_dir(d), dtype=torch.float32, **kw)


def test_registry_points_at_this_class():
    assert model_class("deepseek-ocr") is DeepseekOcrModel
    assert DeepseekOcrModel.kind == "deepseek-ocr"


def test_loads_every_tensor_with_its_value(deepseek_ckpt, deepseek_model_f32):
    tensors = load_file(str(deepseek_ckpt / WEIGHTS))
    params = deepseek_model_f32.net.state_dict()
    assert set(params) == set(tensors)  # strict 1:1 with the original key names
    for k in (
        "model.view_seperator",
        "model.sam_model.blocks.1.attn.rel_pos_h",
        "lm_head.weight",
        "model.layers.2.mlp.experts.7.down_proj.weight",
        "model.vision_model.pre_layrnorm.weight",
    ):
        assert params[k].dtype == torch.float32
        assert torch.equal(params[k], tensors[k].float()), k
    assert deepseek_model_f32.eos_token_ids == frozenset({1})
    assert deepseek_model_f32.bos_token_id == 0
    assert deepseek_model_f32.image_token_id == deepseek_model_f32.tokenizer.token_to_id("<image>")


def test_missing_key_is_named(deepseek_ckpt, tmp_path):
    d = _variant(
        deepseek_ckpt, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    )
    with pytest.raises(
        ModelLoadError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"
    ):
        _load(d)


def test_unexpected_key_is_named(deepseek_ckpt, tmp_path):
    def add(t):
        t["model.vision_model.post_layernorm.weight"] = torch.zeros(48, dtype=torch.bfloat16)
        t["model.vision_model.embeddings.position_ids"] = torch.arange(257)[None]  # tolerated (re-saved checkpoints carry CLIP's position-id buffer)

    d = _variant(deepseek_ckpt, tmp_path / "u", add)
    with pytest.raises(
        ModelLoadError, match=r"unexpected tensors: model\.vision_model\.post_layernorm\.weight$"
    ):
        _load(d)


def test_position_ids_is_tolerated(deepseek_ckpt, tmp_path):
    d = _variant(
        deepseek_ckpt,
        tmp_path / "p",
        lambda t: t.__setitem__("model.vision_model.embeddings.position_ids", torch.arange(257)[None]),
    )
    _load(d)


def test_wrong_shape_is_named(deepseek_ckpt, tmp_path):
    def bad(t):
        t["model.sam_model.blocks.0.attn.rel_pos_h"] = torch.zeros(127, 16, dtype=torch.bfloat16)

    d = _variant(deepseek_ckpt, tmp_path / "s", bad)
    with pytest.raises(
        ModelLoadError,
        match=r"wrong shapes: model\.sam_model\.blocks\.0\.attn\.rel_pos_h \(checkpoint \[127, 16\], expected \[27, 16\]\)",
    ):
        _load(d)


def test_sharded_index_loads_same_weights(tmp_path, deepseek_model_f32):
    d = build_tiny_checkpoint(tmp_path / "sharded", shards=3)
    assert (d / "model.safetensors.index.json").is_file()
    m = _load(d)
    a = m.net.state_dict()
    for k, v in deepseek_model_f32.net.state_dict().items():
        assert torch.equal(a[k], v), k


def test_quantize_and_bad_dtype_rejected(deepseek_ckpt):
    with pytest.raises(ModelLoadError, match="quantize"):
        _load(deepseek_ckpt, quantize="int4")
    with pytest.raises(ModelLoadError, match="dtype"):
        DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.int8)


def test_bf16_load_keeps_checkpoint_values(deepseek_ckpt):
    m = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16)
    t = load_file(str(deepseek_ckpt / WEIGHTS))
    p = m.net.state_dict()
    assert set(p) == set(t)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.experts.3.gate_proj.weight"):
        assert p[k].dtype == torch.bfloat16 and torch.equal(p[k], t[k]), k


def test_official_config_parses_to_spec_values():
    cfg = DeepseekOcrConfig.from_dict(full_config())
    lm = cfg.language
    assert (lm.vocab_size, lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.head_dim) == (
        129280,
        1280,
        12,
        10,
        128,
    )
    assert (lm.intermediate_size, lm.moe_intermediate_size, lm.n_routed_experts, lm.n_shared_experts) == (
        6848,
        896,
        64,
        2,
    )
    assert lm.num_experts_per_tok == 6 and not lm.norm_topk_prob and lm.routed_scaling_factor == 1.0
    assert lm.rms_norm_eps == 1e-6 and lm.rope_theta == 10000.0 and lm.max_position_embeddings == 8192
    assert [lm.is_moe_layer(i) for i in range(12)] == [False] + [True] * 11
    assert (cfg.sam.width, cfg.sam.layers, cfg.sam.heads, cfg.sam.global_attn_indexes) == (
        768,
        12,
        12,
        (2, 5, 8, 11),
    )
    assert (cfg.sam.mlp_dim, cfg.sam.out_chans, cfg.sam.downsample_channels) == (3072, 256, (512, 1024))
    assert (cfg.clip.width, cfg.clip.layers, cfg.clip.heads, cfg.clip.mlp_dim, cfg.clip.num_positions) == (
        1024,
        24,
        16,
        4096,
        257,
    )
    assert (cfg.projector_input_dim, cfg.projector_n_embed) == (2048, 1280)
    # the official layout: 2,710 tensors, 3,336,106,240 parameters
    shapes = original_shapes(full_config())
    assert len(shapes) == 2710
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 3_336_106_240


def test_top_level_keys_win_like_hf(deepseek_ckpt):
    raw = json.loads((deepseek_ckpt / "config.json").read_text())
    raw["language_config"]["num_hidden_layers"] = 99  # HF builds its config from the top-level copy
    assert DeepseekOcrConfig.from_dict(raw).language.num_hidden_layers == 3
    del raw["num_hidden_layers"]
    assert DeepseekOcrConfig.from_dict(raw).language.num_hidden_layers == 99
    raw["use_mla"] = True
    with pytest.raises(ModelLoadError, match="use_mla"):
        DeepseekOcrConfig.from_dict(raw)


def test_full_size_module_tree_matches_the_original_layout():
    """The official sizes built on the meta device (no memory): every parameter name and shape equals
    the original checkpoint's, which has 2,710 tensors and 3,336,106,240 parameters,
    and the module holds no buffers (nothing outside the checkpoint is needed to run it)."""
    with torch.device("meta"):
        net = DeepseekOcrForCausalLM(DeepseekOcrConfig.from_dict(full_config()))
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    want = original_shapes(full_config())
    assert sorted(set(ours) ^ set(want)) == []
    assert {k for k in ours if ours[k] != want[k]} == set()
    assert len(ours) == 2710
    assert sum(p.numel() for p in net.parameters()) == 3_336_106_240
    assert list(net.named_buffers()) == []
    # the parameters are the checkpoint's tensors (q/k/v and gate/up each one fused layer, stored apart)
    stored = checkpoint_names(net)
    assert {s for k, _ in net.named_parameters() for s in stored.get(k, [k])} == set(want)
