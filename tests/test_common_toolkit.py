"""The shared toolkit (models/common): fusion at load keeps the checkpoint's names, the KV cache grows
within the context, decode attention is plain attention, stop ids follow generation_config.json."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from deepseek_ocr_server.models import model_class
from deepseek_ocr_server.models.base import ModelFiles
from deepseek_ocr_server.models.common import GatedMLP, KVCache, decode_attention, fuse_state_dict
from deepseek_ocr_server.models.common.cache import INITIAL_DECODE_RESERVE, initial_capacity
from deepseek_ocr_server.models.common.loading import stop_token_ids
from deepseek_ocr_server.models.glm_ocr.model import mtp_pattern
from deepseek_ocr_server.models.paddleocr_vl.model import UNUSED_KEY_PATTERNS

#: family -> (kind, fixture of its tiny checkpoint)
FAMILIES = {
    "deepseek": ("deepseek-ocr", "deepseek_ckpt"),
    "deepseek2": ("deepseek-ocr-2", "deepseek2_ckpt"),
    "paddle": ("paddleocr-vl", "paddle_ckpt"),
    "glm": ("glm-ocr", "glm_ckpt"),
}


def _checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[k] = st.get_tensor(k)
    return out


def _kept(kind: str, model, keys: set[str]) -> set[str]:
    """The checkpoint keys a loaded model keeps (it drops unused tensors and GLM-OCR's MTP layer)."""
    if kind == "paddleocr-vl":
        return {k for k in keys if not any(p.search(k) for p in UNUSED_KEY_PATTERNS)}
    if kind == "glm-ocr":
        return {k for k in keys if not mtp_pattern(model.config).search(k)}
    return keys


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_has_the_checkpoint_names_and_values(family: str, request: pytest.FixtureRequest) -> None:
    kind, fixture = FAMILIES[family]
    ckpt = request.getfixturevalue(fixture)
    stored = _checkpoint(ckpt)
    for packed in (True, False):
        m = model_class(kind).load(ModelFiles.from_dir(ckpt), dtype=torch.float32)
        m.set_packed(packed)
        sd = m.net.state_dict()
        assert set(sd) == _kept(kind, m, set(stored)), packed
        # some fused layer exists and its parts come back as stored
        fused = [k for k in sd if re.search(r"\.(q_proj|gate_proj)\.weight$", k)]
        assert fused
        for k in fused:
            assert torch.equal(sd[k], stored[k].float()), k
    assert not any(k.endswith(("qkv_proj.weight", "gate_up_proj.weight")) and k not in stored for k in sd)


def test_strict_load_still_rejects_missing_and_unexpected_keys(deepseek_model_f32) -> None:
    net = deepseek_model_f32.net
    sd = net.state_dict()
    fresh = type(net)(deepseek_model_f32.config)
    fresh.load_state_dict(sd, strict=True)  # the checkpoint names load into the fused layers
    got = fresh.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)

    missing = dict(sd)
    del missing["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        fresh.load_state_dict(missing, strict=True)
    extra = {**sd, "model.layers.0.self_attn.w_proj.weight": sd["model.layers.0.self_attn.q_proj.weight"]}
    with pytest.raises(RuntimeError, match=r"Unexpected key.*w_proj"):
        fresh.load_state_dict(extra, strict=True)


def test_fuse_state_dict_concatenates_in_place_and_drops_the_parts() -> None:
    mlp = GatedMLP(6, 4)
    g, u, d = torch.randn(4, 6), torch.randn(4, 6), torch.randn(6, 4)
    state = {"gate_proj.weight": g, "up_proj.weight": u, "down_proj.weight": d}
    fuse_state_dict(mlp, state)
    assert set(state) == {"gate_up_proj.weight", "down_proj.weight"}
    assert torch.equal(state["gate_up_proj.weight"], torch.cat([g, u]))
    mlp.load_state_dict(state, strict=True)
    x = torch.randn(3, 6)
    want = d @ (torch.nn.functional.silu(x @ g.T) * (x @ u.T)).T
    torch.testing.assert_close(mlp(x), want.T, rtol=1e-5, atol=1e-5)
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}


def test_kv_cache_grows_geometrically_within_its_limit() -> None:
    assert initial_capacity(3, 1, 10) == 4 and initial_capacity(3, 5000, 10_000) == 3 + INITIAL_DECODE_RESERVE
    assert initial_capacity(9, 5, 10) == 10
    c = KVCache(2, 1, 4, initial_capacity(3, 1, 10), torch.float32, "cpu", limit=10)
    assert c.capacity == 4
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    for layer in range(2):
        c.write(layer, k[layer], -k[layer])
    c.advance(3)
    c.reserve(5)
    assert c.capacity == 8 and torch.equal(c.k[:, :, :3], k) and torch.equal(c.v[:, :, :3], -k)
    c.reserve(9)
    assert c.capacity == 10  # doubled, then cut at the limit
    with pytest.raises(ValueError, match="context of 10"):
        c.reserve(11)
    c.release()
    with pytest.raises(RuntimeError):
        c.reserve(1)


def test_decode_attention_is_plain_attention_per_row() -> None:
    """Two sequences of different lengths, grouped-query (4 heads over 2 kv heads)."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, d = 4, 2, 8
    caches = []
    for n in (5, 2):
        c = KVCache(1, kv_heads, d, n + 1, torch.float32, "cpu")
        c.write(0, torch.randn(kv_heads, n, d, generator=gen), torch.randn(kv_heads, n, d, generator=gen))
        c.advance(n)
        caches.append(c)
    q = torch.randn(2, heads, d, generator=gen)
    k = torch.randn(2, kv_heads, d, generator=gen)
    v = torch.randn(2, kv_heads, d, generator=gen)
    got = decode_attention(q, k, v, caches, 0, d**-0.5)
    for i, c in enumerate(caches):
        n = c.length + 1
        kk = c.k[0, :, :n].repeat_interleave(heads // kv_heads, 0)
        vv = c.v[0, :, :n].repeat_interleave(heads // kv_heads, 0)
        assert torch.equal(kk[::2, -1], k[i])  # the new position was written
        p = torch.softmax(q[i, :, None] @ kk.transpose(1, 2) / math.sqrt(d), -1)
        torch.testing.assert_close(got[i], (p @ vv).reshape(-1), rtol=1e-5, atol=1e-6)


def test_stop_ids_come_from_generation_config_else_the_model_config(tmp_path: Path) -> None:
    files = ModelFiles(tmp_path / "config.json", tmp_path / "w.safetensors", tmp_path / "t.json", tmp_path)
    assert stop_token_ids((1, 2), files) == frozenset({1, 2})  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert stop_token_ids((1,), files) == frozenset({7})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert stop_token_ids((1,), files) == frozenset({7, 9})


def test_no_family_keeps_its_own_norm_or_cache() -> None:
    """RMSNorm and the KV cache exist once (models/common)."""
    import deepseek_ocr_server.models as models

    root = Path(models.__file__).parent
    for path in root.glob("*/*.py"):
        if path.parent.name == "common":
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^class \w*(RMSNorm|KVCache)\b", text, re.M), path


def test_fused_layer_is_one_module_in_the_tree(deepseek_model_f32) -> None:
    attn = deepseek_model_f32.net.model.layers[0].self_attn
    names = {n for n, _ in attn.named_children()}
    assert names == {"qkv_proj", "o_proj"}
    assert isinstance(attn.qkv_proj, nn.Module)
