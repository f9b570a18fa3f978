"""Random-weight PaddleOCR-VL checkpoints in the ORIGINAL layout (the published checkpoint's key names and shapes).

``build_tiny_checkpoint`` writes a few-hundred-KB model that transformers'
``PaddleOCRVLForConditionalGeneration`` and our implementation both load (parity tests);
``build_full_checkpoint`` writes the real sizes (620 tensors, bf16, ~1.9 GB) for benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers

from .common import build_tokenizer as assemble_tokenizer
from .common import is_complete, random_checkpoint, tiny_layout

SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<|IMAGE_PLACEHOLDER|>",
    "<|IMAGE_START|>",
    "<|IMAGE_END|>",
    "<|VIDEO_PLACEHOLDER|>",
]

#: The chat template written into test checkpoints ("variant B", the later checkpoint revisions' template).
CHAT_TEMPLATE_B = """{%- if not add_generation_prompt is defined -%}
    {%- set add_generation_prompt = true -%}
{%- endif -%}
{%- if not cls_token is defined -%}
    {%- set cls_token = "<|begin_of_sentence|>" -%}
{%- endif -%}
{%- if not eos_token is defined -%}
    {%- set eos_token = "</s>" -%}
{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
    {%- if message["role"] == "user" -%}
        {{- "User: " -}}
        {%- for content in message["content"] -%}
            {%- if content["type"] == "image" -%}
                {{ "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" }}
            {%- endif -%}
        {%- endfor -%}
        {%- for content in message["content"] -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] }}
            {%- endif -%}
        {%- endfor -%}
        {{ "\\n" -}}
    {%- elif message["role"] == "assistant" -%}
        {{- "Assistant:\\n" -}}
        {%- for content in message["content"] -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] }}
            {%- endif -%}
        {%- endfor -%}
        {{ eos_token -}}
    {%- elif message["role"] == "system" -%}
        {%- for content in message["content"] -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] + "\\n" }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "Assistant:\\n" -}}
{%- endif -%}
"""

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    mrope_section=[4, 6, 6],
    vocab_size=512,
    max_position_embeddings=4096,
)
TINY_VISION = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4)
FULL_TEXT = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=18,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=128,
    mrope_section=[16, 24, 24],
    vocab_size=103424,
    max_position_embeddings=131072,
)
FULL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
TINY_PIXELS = (28 * 28 * 4, 28 * 28 * 40)
FULL_PIXELS = (147384, 2822400)


def build_tokenizer() -> Tokenizer:
    """A small byte-fallback BPE in the SentencePiece style of the real tokenizer (no BOS post-processor)."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:.,"]
    merges_txt = [("U", "s"), ("Us", "e"), ("Use", "r"), ("O", "C"), ("OC", "R"), ("A", "s"), ("As", "s")]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    for a, b in merges_txt:
        vocab.setdefault(a + b, len(vocab))
    return assemble_tokenizer(
        models.BPE(vocab=vocab, merges=merges_txt, unk_token="<unk>", byte_fallback=True, fuse_unk=True),
        SPECIAL_TOKENS,
        normalizer=normalizers.Replace(" ", "▁"),
        decoder=decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]),
    )


def _config(tok: Tokenizer, text: dict[str, Any], vision: dict[str, Any], dtype: str) -> dict[str, Any]:
    t = dict(text)
    section = t.pop("mrope_section")
    return {
        "architectures": ["PaddleOCRVLForConditionalGeneration"],
        "model_type": "paddleocr_vl",
        **t,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000,
        "rope_scaling": {"mrope_section": section, "rope_type": "default", "type": "default"},
        "tie_word_embeddings": False,
        "use_bias": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "image_token_id": tok.token_to_id("<|IMAGE_PLACEHOLDER|>"),
        "vision_start_token_id": tok.token_to_id("<|IMAGE_START|>"),
        "vision_end_token_id": tok.token_to_id("<|IMAGE_END|>"),
        "video_token_id": tok.token_to_id("<|VIDEO_PLACEHOLDER|>"),
        "torch_dtype": dtype,
        "use_3d_rope": True,
        "rope_is_neox_style": True,
        "weight_share_add_bias": True,
        "compression_ratio": 1.0,
        "use_flash_attention": False,
        "use_cache": True,
        "vision_config": {
            "model_type": "paddleocr_vl",
            **vision,
            "num_channels": 3,
            "image_size": 384,
            "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-06,
            "attention_dropout": 0.0,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
        },
    }


def checkpoint_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of the original checkpoint (used and unused) with its shape, in file order."""
    v = cfg["vision_config"]
    vh, vi, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    side = v["image_size"] // p
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    s: dict[str, tuple[int, ...]] = {"lm_head.weight": (vocab, h)}
    e = "visual.vision_model.embeddings."
    s[e + "patch_embedding.weight"] = (vh, 3, p, p)
    s[e + "patch_embedding.bias"] = (vh,)
    s[e + "position_embedding.weight"] = (side * side, vh)
    s[e + "packing_position_embedding.weight"] = (32768, vh)
    for i in range(v["num_hidden_layers"]):
        b = f"visual.vision_model.encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            s[b + n + ".weight"] = (vh,)
            s[b + n + ".bias"] = (vh,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[b + f"self_attn.{n}.weight"] = (vh, vh)
            s[b + f"self_attn.{n}.bias"] = (vh,)
        s[b + "mlp.fc1.weight"] = (vi, vh)
        s[b + "mlp.fc1.bias"] = (vi,)
        s[b + "mlp.fc2.weight"] = (vh, vi)
        s[b + "mlp.fc2.bias"] = (vh,)
    s["visual.vision_model.post_layernorm.weight"] = (vh,)
    s["visual.vision_model.post_layernorm.bias"] = (vh,)
    hd_ = "visual.vision_model.head."
    s[hd_ + "probe"] = (1, 1, vh)
    s[hd_ + "attention.in_proj_weight"] = (3 * vh, vh)
    s[hd_ + "attention.in_proj_bias"] = (3 * vh,)
    s[hd_ + "attention.out_proj.weight"] = (vh, vh)
    s[hd_ + "attention.out_proj.bias"] = (vh,)
    s[hd_ + "layernorm.weight"] = (vh,)
    s[hd_ + "layernorm.bias"] = (vh,)
    s[hd_ + "mlp.fc1.weight"] = (vi, vh)
    s[hd_ + "mlp.fc1.bias"] = (vi,)
    s[hd_ + "mlp.fc2.weight"] = (vh, vi)
    s[hd_ + "mlp.fc2.bias"] = (vh,)
    m = 4 * vh
    s["mlp_AR.pre_norm.weight"] = (vh,)
    s["mlp_AR.pre_norm.bias"] = (vh,)
    s["mlp_AR.linear_1.weight"] = (m, m)
    s["mlp_AR.linear_1.bias"] = (m,)
    s["mlp_AR.linear_2.weight"] = (h, m)
    s["mlp_AR.linear_2.bias"] = (h,)
    s["model.embed_tokens.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        s[b + "self_attn.q_proj.weight"] = (nq * hd, h)
        s[b + "self_attn.k_proj.weight"] = (nkv * hd, h)
        s[b + "self_attn.v_proj.weight"] = (nkv * hd, h)
        s[b + "self_attn.o_proj.weight"] = (h, nq * hd)
        s[b + "mlp.gate_proj.weight"] = (inter, h)
        s[b + "mlp.up_proj.weight"] = (inter, h)
        s[b + "mlp.down_proj.weight"] = (h, inter)
        s[b + "input_layernorm.weight"] = (h,)
        s[b + "post_attention_layernorm.weight"] = (h,)
    s["model.norm.weight"] = (h,)
    return s


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, scale: float) -> torch.Tensor:
    """Random weights with spread-out logits: norms 1+N(0, .1), biases N(0, .05), embeddings N(0, .5),
    matrices N(0, scale) / sqrt(fan_in)."""
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1 or name.endswith("bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    if "embed" in name or "lm_head" in name:
        return (
            0.5 * torch.randn(shape, generator=gen)
            if scale >= 1
            else 0.02 * torch.randn(shape, generator=gen)
        )
    fan_in = 1
    for dim in shape[1:]:
        fan_in *= dim
    return torch.randn(shape, generator=gen) * (scale / fan_in**0.5)


def _write_side_files(d: Path, tok: Tokenizer, cfg: dict[str, Any], pixels: tuple[int, int]) -> None:
    tok.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": False,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<unk>",
                "cls_token": "<|begin_of_sentence|>",
                "sep_token": "<|end_of_sentence|>",
                "extra_special_tokens": {"image_token": "<|IMAGE_PLACEHOLDER|>"},
                "processor_class": "PaddleOCRVLProcessor",
                "tokenizer_class": "LlamaTokenizer",
                "model_max_length": cfg["max_position_embeddings"],
            },
            indent=2,
        )
    )
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE_B)
    (d / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "PaddleOCRVLImageProcessor",
                "processor_class": "PaddleOCRVLProcessor",
                "do_convert_rgb": True,
                "do_resize": True,
                "do_rescale": True,
                "do_normalize": True,
                "resample": 3,
                "rescale_factor": 1 / 255,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "min_pixels": pixels[0],
                "max_pixels": pixels[1],
                "patch_size": 14,
                "merge_size": 2,
                "temporal_patch_size": 1,
            },
            indent=2,
        )
    )
    (d / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    )


def build_tiny_checkpoint(
    directory: str | Path,
    seed: int = 0,
    omit: tuple[str, ...] = (),
    extra: dict[str, tuple[int, ...]] | None = None,
    reshape: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Tiny random checkpoint (76 tensors, float32). ``omit``/``extra``/``reshape`` corrupt it on purpose
    (loading-error tests)."""
    tok = build_tokenizer()
    cfg = _config(tok, TINY_TEXT, TINY_VISION, "float32")
    shapes = tiny_layout(checkpoint_shapes(cfg), omit, extra, reshape)
    return random_checkpoint(
        directory,
        shapes,
        random_tensor,
        lambda d: _write_side_files(d, tok, cfg, TINY_PIXELS),
        seed=seed,
        scale=1.5,
        dtype=torch.float32,
    )


def build_full_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Real-size random checkpoint (620 bf16 tensors, all original keys; ~1.9 GB). Skips work when the
    directory already holds a complete one."""
    if is_complete(directory):
        return Path(directory)
    tok = build_tokenizer()
    cfg = _config(tok, FULL_TEXT, FULL_VISION, "bfloat16")
    return random_checkpoint(
        directory,
        checkpoint_shapes(cfg),
        random_tensor,
        lambda d: _write_side_files(d, tok, cfg, FULL_PIXELS),
        seed=seed,
        scale=0.6,
        dtype=torch.bfloat16,
    )
