"""float16 decode storage of a bfloat16 DeepSeek-OCR (models/layers.py): loaded straight into float16,
same greedy tokens as plain bfloat16 storage, float32 and int8 models unaffected."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from decode_storage_checks import assert_same_greedy, greedy_steps
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from deepseek_ocr_server.models.base import ModelFiles, VisionSettings
from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrModel
from deepseek_ocr_server.models.layers import F16_MAX_ROWS, is_decoder_linear
from deepseek_ocr_server.models.quant import Int8Linear

TINY = VisionSettings(base_size=512, image_size=512, crop_mode=False)


def _page() -> Image.Image:
    img = Image.new("RGB", (300, 200), (250, 250, 245))
    d = ImageDraw.Draw(img)
    for y in range(10, 190, 24):
        d.rectangle((12, y, 270, y + 8), fill=(20, 20, 20))
    return img


def _load(d: Path, **kw) -> DeepseekOcrModel:
    return DeepseekOcrModel.load(ModelFiles.from_dir(d), **kw)


def test_bf16_loads_decoder_linears_in_float16(deepseek_ckpt):
    m = _load(deepseek_ckpt, dtype=torch.bfloat16)
    assert m.decode_dtype == torch.float16
    dtypes = {k: p.dtype for k, p in m.net.named_parameters()}
    f16 = {k for k, d in dtypes.items() if d == torch.float16}
    expected = {k for k in dtypes if is_decoder_linear(k)}
    # attention, dense MLP, every routed and shared expert, lm_head; not the routers
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in expected
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in expected
    assert "model.layers.0.self_attn.q_proj.weight" in expected and "lm_head.weight" in expected
    assert f16 == expected
    assert {d for k, d in dtypes.items() if k not in f16} == {torch.bfloat16}
    # layers every row of a batch goes through keep a bfloat16 copy; routed experts do not
    attn = m.net.model.layers[0].self_attn.q_proj
    assert attn.batch_weight.dtype == torch.bfloat16
    assert torch.equal(attn.batch_weight, attn.weight.to(torch.bfloat16))
    assert m.net.model.layers[1].mlp.shared_experts.up_proj.batch_weight is not None
    assert m.net.lm_head.batch_weight is not None
    assert m.net.model.layers[1].mlp.experts[0].up_proj.batch_weight is None
    # the values are the checkpoint's bf16 values, exactly
    t = load_file(str(next(deepseek_ckpt.glob("*.safetensors"))))
    w = m.net.model.layers[1].mlp.experts[3].gate_proj.weight
    assert torch.equal(w.to(torch.bfloat16), t["model.layers.1.mlp.experts.3.gate_proj.weight"])


def test_float16_storage_decodes_like_bfloat16(deepseek_ckpt):
    m = _load(deepseek_ckpt, dtype=torch.bfloat16)
    prep = m.prepare("Free OCR.", [_page()], TINY)
    f16 = greedy_steps(m, prep, 32)
    m.set_decode_dtype(None)
    assert m.decode_dtype is None and {p.dtype for p in m.net.parameters()} == {torch.bfloat16}
    assert m.net.lm_head.batch_weight is None
    plain = greedy_steps(m, prep, 32)
    m.set_decode_dtype(torch.float16)
    assert m.decode_dtype == torch.float16
    assert_same_greedy(plain, f16, greedy_steps(m, prep, 32, forced=plain[0]))
    # batched decode of two sequences with float16 storage: each row as alone
    toks = plain[0]
    _, c1 = m.prefill(prep, 4)
    _, c2 = m.prefill(prep, 4)
    _, c3 = m.prefill(prep, 4)
    both = m.decode([toks[0], toks[1]], [c1, c2])
    alone = m.decode([toks[1]], [c3])[0]
    assert torch.equal(both[1], alone)
    # more rows than F16_MAX_ROWS: the bfloat16 batch copies, close to the row alone
    caches = [m.prefill(prep, 4)[1] for _ in range(F16_MAX_ROWS + 1)]
    rows = m.decode([toks[1]] * len(caches), caches)
    assert all(torch.equal(r, rows[0]) for r in rows)
    assert (rows[0] - alone).abs().max() <= 0.05 * alone.abs().max()


def test_float32_and_int8_keep_their_storage(deepseek_ckpt, deepseek_model_f32):
    assert deepseek_model_f32.decode_dtype is None
    assert {p.dtype for p in deepseek_model_f32.net.parameters()} == {torch.float32}
    q = _load(deepseek_ckpt, dtype=torch.bfloat16, quantize="int8")
    assert q.decode_dtype is None
    assert isinstance(q.net.model.layers[1].mlp.experts[0].down_proj, Int8Linear)
    assert torch.float16 not in {p.dtype for p in q.net.parameters()}
    toks, logits = greedy_steps(q, q.prepare("Free OCR.", [], TINY), 4)
    assert len(toks) == 4 and torch.isfinite(logits).all()


def test_weight_outside_float16_range_keeps_bfloat16(deepseek_ckpt, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(deepseek_ckpt, d)
    f = next(d.glob("*.safetensors"))
    t = load_file(str(f))
    t["model.layers.1.mlp.experts.2.up_proj.weight"][0, 0] = 1e6  # representable in bf16, not in f16
    save_file(t, str(f))
    m = _load(d, dtype=torch.bfloat16)
    mlp = m.net.model.layers[1].mlp
    assert mlp.experts[2].up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(mlp.experts[2].up_proj.weight, t["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert mlp.experts[2].gate_proj.weight.dtype == torch.float16
    toks, logits = greedy_steps(m, m.prepare("Free OCR.", [], TINY), 3)
    assert torch.isfinite(logits).all()
