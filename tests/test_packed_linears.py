"""Linear layers pre-packed for oneDNN (models/layers.py): the same numbers as ``nn.Linear`` (bfloat16:
bit for bit; float32: to rounding), one weight copy, every linear of every family packed on CPU (q/k/v
and gate/up as the one layer they are fused into at load), the int8 and plain paths untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from deepseek_ocr_server.models import cpukernels
from deepseek_ocr_server.models.base import ModelFiles, OcrModel, Prepared
from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrModel
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.models.layers import (
    PackedLinear,
    pack_linears,
    packed_count,
    packing_supported,
    unpack_linears,
)
from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel
from deepseek_ocr_server.models.quant import Int8Linear

BF16 = packing_supported("cpu", torch.bfloat16)
needs_bf16 = pytest.mark.skipif(not BF16, reason="oneDNN has no bfloat16 support on this CPU")
TINY = VisionSettings(base_size=512, image_size=512, crop_mode=False)


def _page() -> Image.Image:
    img = Image.new("RGB", (300, 200), (250, 250, 245))
    d = ImageDraw.Draw(img)
    for y in range(10, 190, 24):
        d.rectangle((12, y, 270, y + 8), fill=(20, 20, 20))
    return img


def _steps(m: OcrModel, prep: Prepared, n: int, forced: list[int] | None = None):
    """Prefill logits, then ``n`` decode steps (fed ``forced`` tokens, else greedy): (tokens, logits)."""
    logits, cache = m.prefill(prep, n + 1)
    toks, out = [], [logits]
    for i in range(n):
        toks.append(int(torch.argmax(logits)))
        logits = m.decode([forced[i] if forced else toks[-1]], [cache])[0]
        out.append(logits)
    return toks, torch.stack(out)


def _linears(net: nn.Module) -> int:
    """Layers that run as their own GEMM: plain and packed ones (a fused layer counts once)."""
    return sum(1 for m in net.modules() if type(m) in (nn.Linear, PackedLinear))


def _plain(net: nn.Module) -> int:
    return sum(1 for m in net.modules() if type(m) is nn.Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 37])
def test_packed_linear_matches_f_linear(dtype, rows):
    if not packing_supported("cpu", dtype):
        pytest.skip("oneDNN cannot run this dtype here")
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(96, 160).to(dtype)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    p = PackedLinear.from_linear(lin)
    assert torch.equal(p.weight, lin.weight) and p.weight.shape == (160, 96)
    with torch.inference_mode():
        want, got = F.linear(x, lin.weight, lin.bias), p(x)
        got3 = p(x.reshape(1, rows, 96))[0]  # leading dims
        got_t = p(x.t().contiguous().t())  # a non-contiguous input
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)  # the same oneDNN kernel: bit for bit
    else:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, torch.zeros_like(got))
    assert torch.equal(got3, got) and torch.equal(got_t, got)
    assert torch.equal(p.to_linear().weight, lin.weight)


def test_pack_and_unpack_in_place():
    shared = nn.Linear(8, 8)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), shared, shared)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        want = net(x)
    assert pack_linears(net, skip=lambda name, _: name == "2") == 2  # "3" and "4" are one layer
    assert type(net[0]) is PackedLinear and type(net[2]) is nn.Linear and net[3] is net[4]
    assert packed_count(net) == 2
    with torch.inference_mode():
        assert torch.allclose(net(x), want, atol=1e-6)
    assert unpack_linears(net) == 2 and packed_count(net) == 0
    with torch.inference_mode():
        assert torch.allclose(net(x), want, atol=1e-6)


def test_packing_supported_only_on_cpu():
    assert not packing_supported("meta", torch.float32)
    assert not packing_supported("cuda", torch.bfloat16)
    assert not packing_supported("cpu", torch.int8)
    assert packing_supported("cpu", torch.float32) == torch.backends.mkldnn.is_available()


@needs_bf16
def test_deepseek_bf16_every_linear_packed_same_numbers(deepseek_ckpt, monkeypatch):
    # with the package's kernels on, the experts stay plain for them (test_cpukernels.py tests that)
    monkeypatch.setattr(cpukernels, "enabled", False)
    m = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16)
    assert m.packed_layers == _linears(m.net) > 0 and _plain(m.net) == 0
    mlp = m.net.model.layers[1].mlp
    assert isinstance(m.net.lm_head, PackedLinear)
    # gate+up of every expert and q/k/v of every layer run as one fused layer each
    assert isinstance(mlp.experts[0].gate_up_proj, PackedLinear) and not hasattr(mlp.experts[0], "up_proj")
    assert isinstance(m.net.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(mlp.shared_experts.gate_up_proj, PackedLinear)
    assert isinstance(mlp.experts[0].down_proj, PackedLinear)
    assert isinstance(m.net.model.sam_model.blocks[0].attn.qkv, PackedLinear)  # vision too
    assert isinstance(mlp.gate.weight, nn.Parameter)  # the router is not a linear layer
    # parameters() holds no linear weight twice: packed weights are not parameters, nothing else is f16
    assert {p.dtype for p in m.net.parameters()} == {torch.bfloat16}
    prep = m.prepare("Free OCR.", [_page()], TINY)
    packed = _steps(m, prep, 12)
    # one batched step of three sequences: each row as alone
    toks = packed[0]
    caches = [m.prefill(prep, 4)[1] for _ in range(3)]
    rows = m.decode([toks[0], toks[1], toks[0]], caches)
    sd = m.net.state_dict()
    m.set_packed(False)
    assert m.packed_layers == 0 and type(m.net.lm_head) is nn.Linear
    assert type(mlp.experts[0].gate_up_proj) is nn.Linear  # still fused: one forward path
    plain_sd = m.net.state_dict()  # the same keys and values, packed or not
    assert sd.keys() == plain_sd.keys() and all(torch.equal(sd[k], plain_sd[k]) for k in sd)
    plain = _steps(m, prep, 12)
    assert packed[0] == plain[0]
    assert torch.equal(packed[1], plain[1])  # bfloat16: bit for bit, prefill and every decode step
    caches = [m.prefill(prep, 4)[1] for _ in range(3)]
    assert torch.equal(m.decode([toks[0], toks[1], toks[0]], caches), rows)
    assert (rows[0] - rows[2]).abs().max() == 0
    m.set_packed(True)
    assert m.packed_layers == _linears(m.net) and _plain(m.net) == 0
    assert torch.equal(_steps(m, prep, 12)[1], plain[1])


def test_deepseek_f32_packed_close_to_plain(deepseek_ckpt):
    m = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.float32)
    if not packing_supported("cpu", torch.float32):
        assert m.packed_layers == 0
        return
    assert m.packed_layers == _linears(m.net) and _plain(m.net) == 0
    prep = m.prepare("Free OCR.", [_page()], TINY)
    packed = _steps(m, prep, 10)
    m.set_packed(False)
    plain = _steps(m, prep, 10, forced=packed[0])
    assert torch.allclose(packed[1], plain[1], rtol=1e-4, atol=1e-4)


@needs_bf16
def test_paddle_bf16_every_linear_packed_same_numbers(paddle_ckpt, monkeypatch):
    monkeypatch.setattr(cpukernels, "enabled", False)  # the kernels' plain layouts: test_cpukernels.py
    m = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=torch.bfloat16)
    assert m.packed_layers == _linears(m.net) > 0 and _plain(m.net) == 0
    assert isinstance(m.net.lm_head, PackedLinear)
    assert isinstance(m.net.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(m.net.model.layers[0].mlp.gate_up_proj, PackedLinear)
    img = Image.new("RGB", (150, 90), (240, 240, 240))
    ImageDraw.Draw(img).rectangle((10, 30, 140, 50), fill=(0, 0, 0))
    prep = m.prepare("OCR:", [img])
    packed = _steps(m, prep, 12)
    m.set_packed(False)
    plain = _steps(m, prep, 12)
    assert packed[0] == plain[0] and torch.equal(packed[1], plain[1])


def test_int8_layers_stay_int8_the_rest_packed(deepseek_ckpt):
    q = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16, quantize="int8")
    assert isinstance(q.net.model.layers[1].mlp.experts[0].down_proj, Int8Linear)
    assert isinstance(q.net.lm_head, Int8Linear)
    vision = q.net.model.vision_model.transformer.layers[0].mlp.fc1
    assert isinstance(vision, PackedLinear if BF16 else nn.Linear)
    toks, logits = _steps(q, q.prepare("Free OCR.", [], TINY), 4)
    assert len(toks) == 4 and torch.isfinite(logits).all()


def _decoder_bytes(ckpt, exclude_experts: bool) -> tuple[int, int]:
    """(bytes of the decoder linears + routers + lm_head in bf16, bytes of one routed expert) from the
    checkpoint's own tensors."""
    from safetensors import safe_open

    dense = expert = 0
    files = list(ckpt.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = st.get_slice(k).get_shape()
                n = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
                if ".mlp.experts." in k and exclude_experts:
                    if k.startswith("model.layers.1.mlp.experts.0."):
                        expert += n
                elif k == "lm_head.weight" or (k.startswith("model.layers.") and (k.endswith("_proj.weight") or k.endswith("mlp.gate.weight"))):
                    dense += n
    return dense, expert


def test_decode_weight_bytes_probe(deepseek_ckpt, paddle_ckpt):
    """``testing.probes.decode_weight_bytes`` (what the benchmarks put next to the memory bandwidth):
    dense layers once per step, of each MoE layer the experts some row selected, however stored."""
    from deepseek_ocr_server.testing.probes import decode_weight_bytes

    m = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16)
    dense, expert = _decoder_bytes(deepseek_ckpt, exclude_experts=True)
    moe = [layer.mlp for layer in m.net.model.layers if hasattr(layer.mlp, "experts")]
    k = m.config.language.num_experts_per_tok
    prep = m.prepare("Free OCR.", [_page()], TINY)
    logits, c1 = m.prefill(prep, 4)
    _, read = decode_weight_bytes(m, [int(torch.argmax(logits))], [c1])
    assert read == dense + expert * k * len(moe)  # one row: top-k experts per layer
    _, read3 = decode_weight_bytes(m, [3, 40, 77], [m.prefill(prep, 4)[1] for _ in range(3)])
    touched, rest = divmod(read3 - dense, expert)
    assert rest == 0 and len(moe) * k <= touched <= len(moe) * min(3 * k, len(moe[0].experts))
    m.set_packed(False)  # the same bytes, however stored
    assert decode_weight_bytes(m, [3, 40, 77], [m.prefill(prep, 4)[1] for _ in range(3)])[1] == read3
    # the plan of a CPU without bf16 (the experts of a step in one grouped kernel call where it is built,
    # no module hooks fire there): the probe still counts the experts the rows selected
    from deepseek_ocr_server.models.precision import decide

    w = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=decide("cpu", "avx2"))
    logits, c2 = w.prefill(w.prepare("Free OCR.", [_page()], TINY), 4)
    routers = [layer.mlp.gate.weight for layer in w.net.model.layers if hasattr(layer.mlp, "experts")]
    wider = sum(r.numel() * (r.element_size() - 2) for r in routers)  # that plan keeps routers in float32
    assert decode_weight_bytes(w, [int(torch.argmax(logits))], [c2])[1] == read + wider

    p = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=torch.bfloat16)
    logits, c = p.prefill(p.prepare("OCR:", []), 2)
    want, _ = _decoder_bytes(paddle_ckpt, exclude_experts=False)
    assert decode_weight_bytes(p, [int(torch.argmax(logits))], [c])[1] == want


def test_int8_of_a_packed_model_quantizes_each_projection(deepseek_ckpt):
    """quantize_linears_int8 on an already packed model (what serve_bench --int8-check does) gives what
    load(quantize="int8") gives; a fused layer's int8 rows and scales are exactly each projection's own
    (per-row scales), and its state_dict splits back under the checkpoint's names."""
    from deepseek_ocr_server.models.quant import quantize_linears_int8, quantize_weight_int8
    from deepseek_ocr_server.models.registry import family

    m = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16)
    ref = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16, quantize="int8")
    plain = m.net.model.layers[1].mlp.experts[0].state_dict()
    quantize_linears_int8(m.net, skip=lambda name, _: family("deepseek-ocr").is_vision(name))
    expert = m.net.model.layers[1].mlp.experts[0]
    assert isinstance(expert.gate_up_proj, Int8Linear) and not any(isinstance(x, PackedLinear) for x in expert.modules())
    sd = expert.state_dict()
    assert set(sd) == {f"{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "scales")}
    for name in ("gate_proj", "up_proj"):
        q, scales = quantize_weight_int8(plain[f"{name}.weight"])
        assert torch.equal(sd[f"{name}.weight"], q) and torch.equal(sd[f"{name}.scales"], scales)
    prep = m.prepare("Free OCR.", [], TINY)
    assert torch.equal(_steps(m, prep, 4)[1], _steps(ref, prep, 4)[1])


def test_broken_onednn_ops_leave_plain_layers(monkeypatch, caplog):
    """The packing ops are torch-internal: a build where they fail (or compute something else) keeps
    plain nn.Linear layers, with a warning, instead of failing the load."""
    import deepseek_ocr_server.models.layers as layers

    def broken(*_a, **_k):
        raise RuntimeError("no such op")

    layers._packing_works.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
    try:
        net = nn.Sequential(nn.Linear(8, 8))
        assert not packing_supported("cpu", torch.float32)
        assert pack_linears(net) == 0 and type(net[0]) is nn.Linear
        assert "plain layers" in caplog.text
    finally:
        monkeypatch.undo()
        layers._packing_works.cache_clear()
    assert packing_supported("cpu", torch.float32) == torch.backends.mkldnn.is_available()
