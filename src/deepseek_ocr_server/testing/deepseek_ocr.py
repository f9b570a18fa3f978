"""Random DeepSeek-OCR checkpoints in the ORIGINAL layout (config.json + safetensors + tokenizer.json).

The key list is written from the published checkpoint's layout (independently of the model code), so
loading one of these checkpoints checks the model's module names against the original layout.

Tiny tokenizer id mapping (byte-level BPE):
    0 ``<｜begin▁of▁sentence｜>`` (BOS), 1 ``<｜end▁of▁sentence｜>`` (EOS), 2 ``<｜▁pad▁｜>`` (PAD),
    3..258 the 256 byte symbols, then a few merges, then the added special tokens in the order of
    ``SPECIAL_TOKENS`` (``<image>`` first). Ids differ from the real tokenizer (``<image>`` is 128815
    there); the model reads them from the tokenizer/config, never hard-coded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from . import common
from .common import key_generator, write_checkpoint

#: the original checkpoint's single weights file
WEIGHTS_NAME = "model-00001-of-000001.safetensors"

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL_TOKENS = [
    "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
    "<td>", "</td>", "<tr>", "</tr>", "<|User|>", "<|Assistant|>",
]  # fmt: skip
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "r"), ("i", "n")]

#: The official sizes, in the original config.json format.
FULL_LANGUAGE: dict[str, Any] = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 1,
    "hidden_size": 1280,
    "intermediate_size": 6848,
    "kv_lora_rank": None,
    "lm_head": True,
    "max_position_embeddings": 8192,
    "moe_intermediate_size": 896,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_attention_heads": 10,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 12,
    "num_key_value_heads": 10,
    "q_lora_rank": None,
    "qk_nope_head_dim": 0,
    "qk_rope_head_dim": 0,
    "rm_head": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "use_mla": False,
    "v_head_dim": 0,
    "vocab_size": 129280,
}
FULL_SAM: dict[str, Any] = {
    "downsample_channels": [512, 1024],
    "global_attn_indexes": [2, 5, 8, 11],
    "heads": 12,
    "layers": 12,
    "width": 768,
}
FULL_CLIP: dict[str, Any] = {"heads": 16, "image_size": 224, "layers": 24, "patch_size": 14, "width": 1024}

#: A tiny configuration (vision towers included) for tests: ~1 M parameters.
TINY_LANGUAGE: dict[str, Any] = {
    **FULL_LANGUAGE,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts_per_tok": 3,
    "num_hidden_layers": 3,
    "vocab_size": 320,
}
TINY_SAM: dict[str, Any] = {
    "downsample_channels": [32, 48],
    "global_attn_indexes": [1, 3],
    "heads": 2,
    "layers": 4,
    "width": 32,
    "out_chans": 16,  # not in the original file (reference: 256); read by our config
}
TINY_CLIP: dict[str, Any] = {"heads": 4, "image_size": 224, "layers": 2, "patch_size": 14, "width": 48}


def make_config(language: dict[str, Any], sam: dict[str, Any], clip: dict[str, Any]) -> dict[str, Any]:
    """config.json in the original format: nested language_config + flat top-level copy (as the published file has them)."""
    lang = {"architectures": ["DeepseekV2ForCausalLM"], **language, "torch_dtype": "bfloat16"}
    return {
        "_name_or_path": "deepseek-ai/DeepSeek-OCR",
        "candidate_resolutions": [[1024, 1024]],
        "global_view_pos": "head",
        "architectures": ["DeepseekOCRForCausalLM"],
        "language_config": lang,
        "model_type": "deepseek_vl_v2",
        "projector_config": {
            "input_dim": clip["width"] + sam["downsample_channels"][1],
            "model_type": "mlp_projector",
            "n_embed": language["hidden_size"],
            "projector_type": "linear",
        },
        "tile_tag": "2D",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "vision_config": {
            "image_size": 1024,
            "mlp_ratio": 3.7362,
            "model_name": "deeplip_b_l",
            "model_type": "vision",
            "width": {"clip-l-14-224": dict(clip), "sam_vit_b": dict(sam)},
        },
        **language,
    }


def original_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every original key with its shape (the published layout), for the sizes in ``config``."""
    lc = config["language_config"]
    h = lc["hidden_size"]
    out = language_shapes(lc)
    out["model.image_newline"] = (h,)
    out["model.view_seperator"] = (h,)
    p = config["projector_config"]
    out["model.projector.layers.weight"] = (p["n_embed"], p["input_dim"])
    out["model.projector.layers.bias"] = (p["n_embed"],)
    s = config["vision_config"]["width"]["sam_vit_b"]
    out.update(sam_shapes(s, s["downsample_channels"][1]))

    c = config["vision_config"]["width"]["clip-l-14-224"]
    cw = c["width"]
    cm = c.get("mlp_dim", 4 * cw)
    cp = "model.vision_model."
    out[cp + "embeddings.class_embedding"] = (cw,)
    out[cp + "embeddings.patch_embedding.weight"] = (cw, 3, c["patch_size"], c["patch_size"])
    out[cp + "embeddings.position_embedding.weight"] = ((c["image_size"] // c["patch_size"]) ** 2 + 1, cw)
    out[cp + "pre_layrnorm.weight"] = (cw,)
    out[cp + "pre_layrnorm.bias"] = (cw,)
    for layer in range(c["layers"]):
        lp = f"{cp}transformer.layers.{layer}."
        for n in ("layer_norm1", "layer_norm2"):
            out[lp + f"{n}.weight"] = (cw,)
            out[lp + f"{n}.bias"] = (cw,)
        out[lp + "self_attn.qkv_proj.weight"] = (3 * cw, cw)
        out[lp + "self_attn.qkv_proj.bias"] = (3 * cw,)
        out[lp + "self_attn.out_proj.weight"] = (cw, cw)
        out[lp + "self_attn.out_proj.bias"] = (cw,)
        out[lp + "mlp.fc1.weight"] = (cm, cw)
        out[lp + "mlp.fc1.bias"] = (cm,)
        out[lp + "mlp.fc2.weight"] = (cw, cm)
        out[lp + "mlp.fc2.bias"] = (cw,)
    return out


def language_shapes(lc: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The DeepSeek-V2 decoder's original keys (``model.embed_tokens``, ``model.layers.*``,
    ``model.norm``, ``lm_head``) for the ``language_config`` sizes (the same in DeepSeek-OCR 2)."""
    h, v = lc["hidden_size"], lc["vocab_size"]
    inter, moe, ne = lc["intermediate_size"], lc["moe_intermediate_size"], lc["n_routed_experts"]
    shared = moe * lc["n_shared_experts"]
    out: dict[str, tuple[int, ...]] = {
        "lm_head.weight": (v, h),
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
    }
    for layer in range(lc["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for n in ("q", "k", "v", "o"):
            out[p + f"self_attn.{n}_proj.weight"] = (h, h)
        if layer < lc["first_k_dense_replace"]:
            out[p + "mlp.gate_proj.weight"] = (inter, h)
            out[p + "mlp.up_proj.weight"] = (inter, h)
            out[p + "mlp.down_proj.weight"] = (h, inter)
        else:
            out[p + "mlp.gate.weight"] = (ne, h)
            for e in range(ne):
                out[p + f"mlp.experts.{e}.gate_proj.weight"] = (moe, h)
                out[p + f"mlp.experts.{e}.up_proj.weight"] = (moe, h)
                out[p + f"mlp.experts.{e}.down_proj.weight"] = (h, moe)
            out[p + "mlp.shared_experts.gate_proj.weight"] = (shared, h)
            out[p + "mlp.shared_experts.up_proj.weight"] = (shared, h)
            out[p + "mlp.shared_experts.down_proj.weight"] = (h, shared)
    return out


def sam_shapes(s: dict[str, Any], out_channels: int) -> dict[str, tuple[int, ...]]:
    """SAM ViT-B's original keys (``model.sam_model.*``) for the ``sam_vit_b`` sizes; ``out_channels``
    is ``net_3``'s output width (1024 in DeepSeek-OCR, 896 in DeepSeek-OCR 2)."""
    out: dict[str, tuple[int, ...]] = {}
    w, heads = s["width"], s["heads"]
    hd = w // heads
    grid = s.get("image_size", 1024) // s.get("patch_size", 16)
    ws = s.get("window_size", 14)
    oc = s.get("out_chans", 256)
    mlp = s.get("mlp_dim", 4 * w)
    c1 = s["downsample_channels"][0]
    sp = "model.sam_model."
    ps = s.get("patch_size", 16)
    out[sp + "patch_embed.proj.weight"] = (w, 3, ps, ps)
    out[sp + "patch_embed.proj.bias"] = (w,)
    out[sp + "pos_embed"] = (1, grid, grid, w)
    for b in range(s["layers"]):
        bp = f"{sp}blocks.{b}."
        rel = 2 * (grid if b in s["global_attn_indexes"] else ws) - 1
        for n in ("norm1", "norm2"):
            out[bp + f"{n}.weight"] = (w,)
            out[bp + f"{n}.bias"] = (w,)
        out[bp + "attn.qkv.weight"] = (3 * w, w)
        out[bp + "attn.qkv.bias"] = (3 * w,)
        out[bp + "attn.proj.weight"] = (w, w)
        out[bp + "attn.proj.bias"] = (w,)
        out[bp + "attn.rel_pos_h"] = (rel, hd)
        out[bp + "attn.rel_pos_w"] = (rel, hd)
        out[bp + "mlp.lin1.weight"] = (mlp, w)
        out[bp + "mlp.lin1.bias"] = (mlp,)
        out[bp + "mlp.lin2.weight"] = (w, mlp)
        out[bp + "mlp.lin2.bias"] = (w,)
    out[sp + "neck.0.weight"] = (oc, w, 1, 1)
    out[sp + "neck.1.weight"] = (oc,)
    out[sp + "neck.1.bias"] = (oc,)
    out[sp + "neck.2.weight"] = (oc, oc, 3, 3)
    out[sp + "neck.3.weight"] = (oc,)
    out[sp + "neck.3.bias"] = (oc,)
    out[sp + "net_2.weight"] = (c1, oc, 3, 3)
    out[sp + "net_3.weight"] = (out_channels, c1, 3, 3)
    return out


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Plausible random values: norms ~1, biases/embeddings small, matrices ~1/sqrt(fan_in)."""
    if len(shape) == 1:
        is_norm_weight = key.endswith(".weight") and ("norm" in key or ".neck.1." in key or ".neck.3." in key)
        if is_norm_weight:
            return 1.0 + 0.1 * torch.randn(shape, generator=gen)
        return 0.2 * torch.randn(shape, generator=gen)
    if "rel_pos" in key or "pos_embed" in key or "position_embedding" in key:
        return 0.2 * torch.randn(shape, generator=gen)
    if key.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) * fan_in**-0.5


def build_tokenizer(path: Path) -> Tokenizer:
    """Byte-level BPE with the DeepSeek-OCR special tokens (ids in the module docstring)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1, PAD: 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    return common.build_tokenizer(
        models.BPE(vocab=vocab, merges=list(_MERGES)),
        (BOS, EOS, PAD, *SPECIAL_TOKENS),
        pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        decoder=decoders.ByteLevel(),
        path=path,
    )


def build_checkpoint(
    directory: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    shapes: Callable[[dict[str, Any]], dict[str, tuple[int, ...]]] | None = None,
    random: Callable[[str, tuple[int, ...], torch.Generator], torch.Tensor] | None = None,
    generation_config: bool = True,
) -> Path:
    """Write config.json, generation_config.json (unless ``generation_config`` is False), tokenizer.json
    and random weights (one file named as the original ``model-00001-of-000001.safetensors``, or
    ``shards`` files plus an index). ``shapes`` (default :func:`original_shapes`) and ``random`` (default
    :func:`random_tensor`) let DeepSeek-OCR 2 reuse all of it with its own layout."""
    layout = (shapes or original_shapes)(config)
    rand = random or random_tensor

    def side_files(d: Path) -> None:
        (d / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if generation_config:
            gen = {
                "_from_model_config": True,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "transformers_version": "4.46.3",
            }
            (d / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        build_tokenizer(d / "tokenizer.json")

    def make(k: str, shape: tuple[int, ...]) -> torch.Tensor:
        return rand(k, shape, key_generator(seed, k))  # values do not depend on the file layout

    return write_checkpoint(
        directory, layout, make, dtype, side_files, weights_name=WEIGHTS_NAME, shards=shards
    )


def tiny_config(**language_overrides: Any) -> dict[str, Any]:
    return make_config({**TINY_LANGUAGE, **language_overrides}, TINY_SAM, TINY_CLIP)


def build_tiny_checkpoint(directory: str | Path, *, seed: int = 0, shards: int = 1) -> Path:
    """Tiny random checkpoint (original layout, tiny towers) for tests."""
    return build_checkpoint(directory, tiny_config(), seed=seed, shards=shards)


def full_config() -> dict[str, Any]:
    return make_config(FULL_LANGUAGE, FULL_SAM, FULL_CLIP)


def build_full_checkpoint(directory: str | Path, *, seed: int = 0) -> Path:
    """Full-size random checkpoint: official sizes, all 2,710 original keys, BF16, single file
    (6.67 GB). Written tensor by tensor, so RAM stays at about one tensor."""
    return build_checkpoint(directory, full_config(), seed=seed)
