"""Part-wise f32 parity of our DeepSeek-OCR modules with reference modules importable offline
from transformers (test-only dependency), loaded with the SAME random weights (names mapped here).

The references are equivalent for the parts compared (same modules, same weights layout); the quirks of
the native transformers port to avoid; each test says what it checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import CLIPVisionConfig  # noqa: E402
from transformers.models.clip.modeling_clip import CLIPEncoderLayer  # noqa: E402
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (  # noqa: E402
    DeepseekOcr2SamVisionConfig,
    DeepseekOcr2TextConfig,
)
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (  # noqa: E402
    DeepseekOcr2SamVisionEncoder,
    DeepseekOcr2TextModel,
)

from deepseek_ocr_server.models.common.rope import Rope  # noqa: E402
from deepseek_ocr_server.models.deepseek_ocr.config import DeepseekOcrConfig  # noqa: E402
from deepseek_ocr_server.models.deepseek_ocr.language import MoEGate  # noqa: E402
from deepseek_ocr_server.models.deepseek_ocr.vision import arrange_image_embeddings  # noqa: E402
from deepseek_ocr_server.testing.deepseek_ocr import tiny_config  # noqa: E402

ATOL = 2e-5


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= ATOL + rtol * scale, f"max abs err {err:.3g} (scale {scale:.3g})"


def _sam_reference(model):
    """transformers' DeepSeek-OCR-2 SAM-B encoder configured as v1's tower (our tiny sizes).

    Equivalent to the v1 reference (HF-ENC ImageEncoderViT): same patch embed, absolute position
    table (bicubic + antialias resize in f32: verified in the installed version's
    ``interpolate_pos_encoding``), windowed/global blocks with unmasked zero padding, decomposed
    rel-pos computed with the UNSCALED query (eager path), exact GELU, neck and the two stride-2
    convs; v1's downsample channels are set explicitly (v2's default is [512, 896]).
    """
    s = model.config.sam
    cfg = DeepseekOcr2SamVisionConfig(
        hidden_size=s.width,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        output_channels=s.out_chans,
        image_size=s.image_size,
        patch_size=s.patch_size,
        window_size=s.window_size,
        global_attn_indexes=list(s.global_attn_indexes),
        downsample_channels=list(s.downsample_channels),
        mlp_dim=s.mlp_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    cfg._attn_implementation = "eager"
    ref = DeepseekOcr2SamVisionEncoder(cfg).eval()
    ours = {k: v for k, v in model.net.model.sam_model.state_dict().items()}
    mapped = {}
    for k, v in ours.items():
        k2 = k.replace("patch_embed.proj.", "patch_embed.projection.").replace("blocks.", "layers.")
        k2 = k2.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
        for a, b in (
            ("neck.0.", "neck.conv1."),
            ("neck.1.", "neck.layer_norm1."),
            ("neck.2.", "neck.conv2."),
            ("neck.3.", "neck.layer_norm2."),
            ("net_2.", "proj.conv1."),
            ("net_3.", "proj.conv2."),
        ):
            if k2.startswith(a):
                k2 = b + k2[len(a) :]
        mapped[k2] = v
    missing, unexpected = ref.load_state_dict(mapped, strict=True), None
    del missing, unexpected
    return ref


@pytest.mark.parametrize("size", [1024, 640])
def test_sam_encoder_matches_transformers(deepseek_model_f32, size):
    """1024 needs no interpolation (the spec's recommended oracle input); 640 also exercises the
    abs-pos (bicubic+antialias) and global rel-pos (linear) resizes, which the installed
    transformers version implements exactly as DeepSeek-OCR's SAM does (checked in its source)."""
    model = deepseek_model_f32
    ref = _sam_reference(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size)).clamp(-1, 1)
    with torch.no_grad():
        want = ref(x).last_hidden_state
        got = model.net.model.sam_model(x)
    assert got.shape == (1, model.config.sam.downsample_channels[1], size // 64, size // 64)
    _close(got, want)


def test_clip_layers_match_transformers(deepseek_model_f32):
    """Our CLIP-L layers vs transformers' CLIPEncoderLayer (pre-LN, quick_gelu, eps 1e-5, bias on all
    linears, bidirectional attention). The fused ``qkv_proj`` is split into q/k/v along the output
    dimension in [q; k; v] order (how transformers' port stores CLIP's attention)."""
    model = deepseek_model_f32
    c = model.config.clip
    cfg = CLIPVisionConfig(
        hidden_size=c.width,
        intermediate_size=c.mlp_dim,
        num_attention_heads=c.heads,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "eager"
    x = torch.randn(2, 1 + 16 * 16, c.width, generator=torch.Generator().manual_seed(3))
    h_ref = x.clone()
    h_ours = x.clone()
    for layer in model.net.model.vision_model.transformer.layers:
        ref = CLIPEncoderLayer(cfg).eval()
        sd = layer.state_dict()
        q, k, v = sd.pop("self_attn.qkv_proj.weight").chunk(3, dim=0)
        qb, kb, vb = sd.pop("self_attn.qkv_proj.bias").chunk(3, dim=0)
        sd.update(
            {
                "self_attn.q_proj.weight": q,
                "self_attn.k_proj.weight": k,
                "self_attn.v_proj.weight": v,
                "self_attn.q_proj.bias": qb,
                "self_attn.k_proj.bias": kb,
                "self_attn.v_proj.bias": vb,
            }
        )
        ref.load_state_dict(sd, strict=True)
        with torch.no_grad():
            h_ref = ref(h_ref, None)
            h_ours = layer(h_ours)
    _close(h_ours, h_ref)


@pytest.mark.parametrize("m", [16, 10])
def test_clip_embeddings_follow_spec(deepseek_model_f32, m):
    """CLS + SAM map as patch tokens + position table (resized bicubic+antialias for m != 16, CLS row
    untouched) + pre_layrnorm, written out step by step (CLS + SAM tokens, position table, pre-layernorm)."""
    vm = deepseek_model_f32.net.model.vision_model
    c = deepseek_model_f32.config.clip
    feats = torch.randn(1, c.width, m, m, generator=torch.Generator().manual_seed(m))
    table = vm.embeddings.position_embedding.weight
    grid = table[1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    if m != 16:
        grid = F.interpolate(grid, size=(m, m), mode="bicubic", align_corners=False, antialias=True)
    pos = torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(m * m, -1)])
    x = torch.cat([vm.embeddings.class_embedding[None, None], feats.flatten(2).transpose(1, 2)], dim=1) + pos
    with torch.no_grad():
        got = vm.pre_layrnorm(vm.embeddings(feats))
    _close(got, F.layer_norm(x, (c.width,), vm.pre_layrnorm.weight, vm.pre_layrnorm.bias, 1e-5))


def _text_reference(model):
    """transformers' DeepSeek-OCR-2 text model: the non-MLA DeepSeek-V2 decoder (LlamaAttention-style
    MHA with rotate-half RoPE over the full head dim, softmax top-k routing without renormalisation,
    one shared MLP of width n_shared*moe_inter). Routed experts are stacked there as
    ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I]."""
    lc = model.config.language
    n = lc.num_hidden_layers
    # the official layout, written out (not derived from our config code): layer 0 dense, the rest MoE
    assert lc.first_k_dense_replace == 1 and n >= 2
    layer_types = ["dense"] + ["sparse"] * (n - 1)
    cfg = DeepseekOcr2TextConfig(
        vocab_size=lc.vocab_size,
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        moe_intermediate_size=lc.moe_intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads,
        n_routed_experts=lc.n_routed_experts,
        n_shared_experts=lc.n_shared_experts,
        num_experts_per_tok=lc.num_experts_per_tok,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        rms_norm_eps=lc.rms_norm_eps,
        max_position_embeddings=lc.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": lc.rope_theta},
        mlp_layer_types=layer_types,
    )
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    ref = DeepseekOcr2TextModel(cfg).eval()
    sd = {}
    ours = model.net.model.state_dict()
    for k, v in ours.items():
        if k.startswith(("sam_model.", "vision_model.", "projector.", "image_newline", "view_seperator")):
            continue
        if ".mlp.experts." in k:
            continue
        sd[k] = v
    for i in range(n):
        if layer_types[i] != "sparse":
            continue
        p = f"layers.{i}.mlp.experts"
        e = range(lc.n_routed_experts)
        sd[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([ours[f"{p}.{j}.gate_proj.weight"], ours[f"{p}.{j}.up_proj.weight"]]) for j in e]
        )
        sd[f"{p}.down_proj"] = torch.stack([ours[f"{p}.{j}.down_proj.weight"] for j in e])
    ref.load_state_dict(sd, strict=True)
    return ref


def test_decoder_matches_transformers(deepseek_model_f32):
    """Random input embeddings through the whole decoder stack + final norm, and the logits."""
    model = deepseek_model_f32
    ref = _text_reference(model)
    lc = model.config.language
    x = torch.randn(1, 37, lc.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(inputs_embeds=x).last_hidden_state[0]
        cache = model.net.model.new_cache(40, torch.float32, torch.device("cpu"))
        got = model.net.model.prefill(x[0].clone(), *model.rope(torch.arange(37)), cache)
    _close(got, want)
    _close(model.net.lm_head(got), F.linear(want, model.net.lm_head.weight))


def test_rope_is_rotate_half_over_full_head_dim(deepseek_model_f32):
    hd = deepseek_model_f32.config.language.head_dim
    rope = Rope(hd, 10000.0, 64, torch.float32, "cpu")
    cos, sin = rope(torch.tensor([7]))
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    assert torch.allclose(cos[0, : hd // 2], torch.cos(7 * inv)) and torch.allclose(
        cos[0, hd // 2 :], torch.cos(7 * inv)
    )
    assert torch.allclose(sin[0, hd // 2 :], torch.sin(7 * inv))


def test_tiled_packing_matches_spec_formula():
    """Image-token layout: mosaic rows span all nw tiles before the newline; local block, then global, then ONE
    separator. Checked element by element with tile/row/col-coded features."""
    nw, nh, q, qb, d = 3, 2, 2, 3, 4
    tiles = torch.zeros(nw * nh, q, q, d)
    for t in range(nw * nh):
        for i in range(q):
            for j in range(q):
                tiles[t, i, j] = torch.tensor([1.0, t, i, j])
    glob = torch.zeros(qb, qb, d)
    for i in range(qb):
        for j in range(qb):
            glob[i, j] = torch.tensor([2.0, 0, i, j])
    nl, sep = torch.full((d,), -1.0), torch.full((d,), -2.0)
    out = arrange_image_embeddings(glob, tiles, (nw, nh), nl, sep)
    expected = []
    for r in range(nh * q):
        for c in range(nw * q):
            tr, i, tc, j = r // q, r % q, c // q, c % q
            expected.append(tiles[tr * nw + tc, i, j])
        expected.append(nl)
    for i in range(qb):
        expected.extend(glob[i, j] for j in range(qb))
        expected.append(nl)
    expected.append(sep)
    assert torch.equal(out, torch.stack(expected))
    assert out.shape[0] == qb * (qb + 1) + 1 + (nh * q) * (nw * q + 1)


def _gate(dtype: torch.dtype) -> MoEGate:
    lc = DeepseekOcrConfig.from_dict(tiny_config()).language
    gate = MoEGate(lc)
    with torch.no_grad():
        gate.weight.copy_(
            torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(21)) * lc.hidden_size**-0.5
        )
    return gate.to(dtype)


def _by_expert(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx, order = idx.sort(dim=-1)
    return w.gather(-1, order), idx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_of_16bit_model_softmaxes_rounded_logits(dtype):
    """bf16/f16: logits from a linear in the activation dtype (what the reference's autocast(bf16) and
    vLLM's bf16 gate compute), then float32 softmax and top-k without renormalisation."""
    gate = _gate(dtype)
    x = torch.randn(200, gate.weight.shape[1], generator=torch.Generator().manual_seed(22)).to(dtype)
    with torch.no_grad():
        w, idx = gate(x)
        probs = F.linear(x, gate.weight).float().softmax(-1)
    assert w.dtype == torch.float32
    want_w, want_idx = torch.topk(probs, k=gate.top_k, dim=-1, sorted=False)
    got_w, got_idx = _by_expert(w, idx)
    want_w, want_idx = _by_expert(want_w, want_idx)
    assert torch.equal(got_idx, want_idx)
    assert torch.equal(got_w, want_w)
    # not the same as softmaxing full-precision logits of the same weights (the test can tell them apart)
    f32 = F.linear(x.float(), gate.weight.float()).softmax(-1)
    assert not torch.equal(f32.gather(-1, idx), w)


def test_router_of_f32_model_is_full_f32():
    gate = _gate(torch.float32)
    x = torch.randn(200, gate.weight.shape[1], generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        w, idx = gate(x)
    want_w, want_idx = torch.topk(F.linear(x, gate.weight).softmax(-1), k=gate.top_k, dim=-1, sorted=False)
    got_w, got_idx = _by_expert(w, idx)
    want_w, want_idx = _by_expert(want_w, want_idx)
    assert torch.equal(got_idx, want_idx)
    assert torch.equal(got_w, want_w)
