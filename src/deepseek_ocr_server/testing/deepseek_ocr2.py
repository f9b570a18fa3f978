"""Random DeepSeek-OCR 2 checkpoints in the ORIGINAL layout (config.json + safetensors + tokenizer.json).

The key list is written from the published checkpoint layout (2,707 tensors at full size),
independently of the model code, so loading one of these checkpoints checks the model's module names
against the original layout. The decoder and SAM keys are v1's (:mod:`.deepseek_ocr`) with SAM's
``net_3`` widened to the encoder width; there is no CLIP and no ``image_newline``.

Like the released repo, the directory has no ``generation_config.json`` (EOS comes from config.json).
The tiny tokenizer is v1's (same special tokens; ids differ from the real tokenizer's).

:func:`transformers_config` writes the same checkpoint's configuration in transformers' native
``deepseek_ocr2`` format, for the parity tests (transformers reads the original key names directly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import deepseek_ocr as v1
from .deepseek_ocr import (
    FULL_LANGUAGE,
    FULL_SAM,
    TINY_LANGUAGE,
    TINY_SAM,
    language_shapes,
    random_tensor,
    sam_shapes,
)
from .deepseek_ocr import WEIGHTS_NAME as WEIGHTS_NAME  # the same file name as v1's

# The official vision sizes are v1's as the original config.json states them (its ``downsample_channels``
# [512, 1024] is stale there: the checkpoint's ``net_3`` has 896 output channels).
FULL_ENCODER: dict[str, Any] = {"dim": 896}
#: what the reference hard-codes for the encoder (the original file only has ``dim``)
ENCODER_DEFAULTS: dict[str, Any] = {
    "layers": 24, "heads": 14, "kv_heads": 2, "intermediate_size": 4864, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
}  # fmt: skip

#: Tiny encoder (with v1's tiny SAM) at the real image geometry (patch 16, 1024/768-px views, 64-px tokens).
TINY_ENCODER: dict[str, Any] = {"dim": 48, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 80}


def make_config(language: dict[str, Any], sam: dict[str, Any], encoder: dict[str, Any]) -> dict[str, Any]:
    """config.json in the original format: nested language_config + flat top-level copy."""
    lang = {"architectures": ["DeepseekV2ForCausalLM"], **language, "torch_dtype": "bfloat16"}
    return {
        "_name_or_path": "deepseek-ai/DeepSeek-OCR-2",
        "candidate_resolutions": [[1024, 1024]],
        "global_view_pos": "head",
        "architectures": ["DeepseekOCR2ForCausalLM"],
        "language_config": lang,
        "model_type": "deepseek_vl_v2",
        "projector_config": {
            "input_dim": encoder["dim"],
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
            "model_name": "deepencoderv2",
            "model_type": "vision",
            "width": {"qwen2-0-5b": dict(encoder), "sam_vit_b": dict(sam)},
        },
        **language,
    }


def _encoder(config: dict[str, Any]) -> dict[str, Any]:
    return {**ENCODER_DEFAULTS, **config["vision_config"]["width"]["qwen2-0-5b"]}


def original_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every original key with its shape, for the sizes in ``config``."""
    lc = config["language_config"]
    h = lc["hidden_size"]
    q = _encoder(config)
    d, inter = q["dim"], q["intermediate_size"]
    hd = d // q["heads"]
    kv = q["kv_heads"] * hd
    out = language_shapes(lc)
    out.update(sam_shapes(config["vision_config"]["width"]["sam_vit_b"], d))
    out["model.view_seperator"] = (h,)
    out["model.projector.layers.weight"] = (h, d)
    out["model.projector.layers.bias"] = (h,)
    out["model.qwen2_model.query_768.weight"] = (144, d)
    out["model.qwen2_model.query_1024.weight"] = (256, d)
    qp = "model.qwen2_model.model.model."
    out[qp + "norm.weight"] = (d,)
    for i in range(q["layers"]):
        p = f"{qp}layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (d, d)
        out[p + "self_attn.q_proj.bias"] = (d,)
        out[p + "self_attn.k_proj.weight"] = (kv, d)
        out[p + "self_attn.k_proj.bias"] = (kv,)
        out[p + "self_attn.v_proj.weight"] = (kv, d)
        out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "self_attn.o_proj.weight"] = (d, d)
        out[p + "mlp.gate_proj.weight"] = (inter, d)
        out[p + "mlp.up_proj.weight"] = (inter, d)
        out[p + "mlp.down_proj.weight"] = (d, inter)
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
    return out


def _random(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if ".query_" in key:  # learned queries: embedding-sized values, like the position tables
        return 0.4 * torch.randn(shape, generator=gen)
    return random_tensor(key, shape, gen)


def build_checkpoint(
    directory: str | Path, config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write config.json, tokenizer.json and random weights (one file, named as the original's): v1's
    builder with this family's layout, and no generation_config.json (as the released repo)."""
    return v1.build_checkpoint(
        directory,
        config,
        seed=seed,
        dtype=dtype,
        shapes=original_shapes,
        random=_random,
        generation_config=False,
    )


def tiny_config(**language_overrides: Any) -> dict[str, Any]:
    return make_config({**TINY_LANGUAGE, **language_overrides}, TINY_SAM, TINY_ENCODER)


def build_tiny_checkpoint(
    directory: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Tiny random checkpoint (original layout, tiny towers, real image geometry) for tests."""
    return build_checkpoint(directory, tiny_config(), seed=seed, dtype=dtype)


def full_config() -> dict[str, Any]:
    """The official config.json's values."""
    return make_config(FULL_LANGUAGE, FULL_SAM, FULL_ENCODER)


def build_full_checkpoint(directory: str | Path, *, seed: int = 0) -> Path:
    """Full-size random checkpoint: official sizes, all 2,707 original keys, BF16, single file (6.8 GB),
    written tensor by tensor (RAM stays at about one tensor)."""
    return build_checkpoint(directory, full_config(), seed=seed)


def transformers_config(config: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """The same model in transformers' native ``deepseek_ocr2`` config format (test oracle only)."""
    lc = config["language_config"]
    s = config["vision_config"]["width"]["sam_vit_b"]
    q = _encoder(config)
    n = lc["num_hidden_layers"]
    k = lc["first_k_dense_replace"]
    return {
        "model_type": "deepseek_ocr2",
        "architectures": ["DeepseekOcr2ForConditionalGeneration"],
        "image_token_id": image_token_id,
        "tie_word_embeddings": False,
        "vision_config": {
            "sam_config": {
                "hidden_size": s["width"],
                "num_hidden_layers": s["layers"],
                "num_attention_heads": s["heads"],
                "global_attn_indexes": list(s["global_attn_indexes"]),
                "image_size": s.get("image_size", 1024),
                "patch_size": s.get("patch_size", 16),
                "window_size": s.get("window_size", 14),
                "output_channels": s.get("out_chans", 256),
                "downsample_channels": [s["downsample_channels"][0], q["dim"]],
                "mlp_dim": s.get("mlp_dim", 4 * s["width"]),
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-6,
            },
            "encoder_config": {
                "hidden_size": q["dim"],
                "intermediate_size": q["intermediate_size"],
                "num_hidden_layers": q["layers"],
                "num_attention_heads": q["heads"],
                "num_key_value_heads": q["kv_heads"],
                "rms_norm_eps": q["rms_norm_eps"],
                "max_position_embeddings": 131072,
                "rope_parameters": {"rope_type": "default", "rope_theta": q["rope_theta"]},
            },
        },
        "text_config": {
            "vocab_size": lc["vocab_size"],
            "hidden_size": lc["hidden_size"],
            "intermediate_size": lc["intermediate_size"],
            "moe_intermediate_size": lc["moe_intermediate_size"],
            "num_hidden_layers": n,
            "num_attention_heads": lc["num_attention_heads"],
            "num_key_value_heads": lc["num_key_value_heads"],
            "n_routed_experts": lc["n_routed_experts"],
            "n_shared_experts": lc["n_shared_experts"],
            "num_experts_per_tok": lc["num_experts_per_tok"],
            "mlp_layer_types": ["dense" if i < k else "sparse" for i in range(n)],
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 1.0,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": lc["max_position_embeddings"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "bos_token_id": lc["bos_token_id"],
            "eos_token_id": lc["eos_token_id"],
            "pad_token_id": 2,
        },
    }
