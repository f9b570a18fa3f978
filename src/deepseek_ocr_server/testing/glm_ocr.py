"""Random-weight GLM-OCR checkpoints in the ORIGINAL layout (``zai-org/GLM-OCR``: one
``model.safetensors``, transformers' key names, a multi-token-prediction layer stored as
``model.language_model.layers.<num_hidden_layers>``).

``build_tiny_checkpoint`` writes a small model that transformers' ``GlmOcrForConditionalGeneration``
and our implementation both load (parity tests); ``build_full_checkpoint`` writes the real sizes
(526 bf16 tensors, 1,325,258,240 parameters, ~2.65 GB) for benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from .common import build_tokenizer as assemble_tokenizer
from .common import is_complete, random_checkpoint, tiny_layout

#: GLM-OCR's added tokens, in id order (the real ids are 59246...59281).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
]

#: The chat template written into test checkpoints: the user/system/assistant part of GLM's template
#: style (block tags on their own lines, rendered with trim_blocks/lstrip_blocks; parts in content order).
CHAT_TEMPLATE = """[gMASK]<sop>
{%- for m in messages %}
{%- if m.role == 'user' -%}<|user|>
{% if m.content is string %}
{{ m.content }}
{%- else %}
{%- for item in m.content %}
{% if item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>{% elif item.type == 'text' %}
{{ item.text }}
{%- endif %}
{%- endfor %}
{%- endif %}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{{ '\\n<think></think>' }}
{%- for item in m.content %}{% if item.type == 'text' %}{{ '\\n' + item.text.strip() }}{% endif %}{% endfor %}
{%- elif m.role == 'system' -%}
<|system|>
{% for item in m.content %}{% if item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{{'<think></think>\\n' if (enable_thinking is defined and not enable_thinking) else ''}}
{%- endif -%}"""

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    mrope_section=[4, 6, 6],
    vocab_size=192,
    max_position_embeddings=8192,
)
TINY_VISION = dict(hidden_size=32, depth=2, num_heads=2, intermediate_size=48, out_hidden_size=64)
FULL_TEXT = dict(
    hidden_size=1536,
    intermediate_size=4608,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    mrope_section=[16, 24, 24],
    vocab_size=59392,
    max_position_embeddings=131072,
)
FULL_VISION = dict(hidden_size=1024, depth=24, num_heads=16, intermediate_size=4096, out_hidden_size=1536)


def build_tokenizer() -> Tokenizer:
    """One token per printable ASCII character (and newline), then the 36 added tokens in order."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0} | {c: i + 1 for i, c in enumerate(chars)}
    return assemble_tokenizer(
        models.WordLevel(vocab=vocab, unk_token="<unk>"),
        SPECIAL_TOKENS,
        pre_tokenizer=pre_tokenizers.Split(Regex("."), behavior="isolated"),
        decoder=decoders.Fuse(),
    )


def make_config(tok: Tokenizer, text: dict[str, Any], vision: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``config.json`` in the original schema (nested ``text_config`` / ``vision_config``)."""
    t = dict(text)
    section = t.pop("mrope_section")
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    return {
        "architectures": ["GlmOcrForConditionalGeneration"],
        "model_type": "glm_ocr",
        "text_config": {
            "model_type": "glm_ocr_text",
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"]],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "num_nextn_predict_layers": 1,
            "rms_norm_eps": 1e-05,
            "dtype": dtype,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": section,
                "partial_rotary_factor": 1.0,
                "rope_theta": 10000,
            },
            "tie_word_embeddings": False,
            "use_cache": True,
            **t,
        },
        "vision_config": {
            "model_type": "glm_ocr_vision",
            "attention_bias": True,
            "hidden_act": "silu",
            "hidden_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "image_size": 336,
            "patch_size": 14,
            "rms_norm_eps": 1e-05,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **vision,
        },
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "transformers_version": "5.0.1dev0",
    }


def _decoder_layer(
    s: dict[str, tuple[int, ...]], b: str, h: int, inter: int, nq: int, nkv: int, hd: int
) -> None:
    s[b + "self_attn.q_proj.weight"] = (nq * hd, h)
    s[b + "self_attn.k_proj.weight"] = (nkv * hd, h)
    s[b + "self_attn.v_proj.weight"] = (nkv * hd, h)
    s[b + "self_attn.o_proj.weight"] = (h, nq * hd)
    s[b + "mlp.gate_up_proj.weight"] = (2 * inter, h)
    s[b + "mlp.down_proj.weight"] = (h, inter)
    for n in (
        "input_layernorm",
        "post_self_attn_layernorm",
        "post_attention_layernorm",
        "post_mlp_layernorm",
    ):
        s[b + n + ".weight"] = (h,)


def checkpoint_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of the original checkpoint with its shape (written from the published layout, not
    from our modules: the loading tests compare the two)."""
    t, v = cfg["text_config"], cfg["vision_config"]
    vh, vi, p, tp = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["temporal_patch_size"]
    out, hd_v = v["out_hidden_size"], v["hidden_size"] // v["num_heads"]
    h, inter, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    nq, nkv, vocab, n_layers = (
        t["num_attention_heads"],
        t["num_key_value_heads"],
        t["vocab_size"],
        t["num_hidden_layers"],
    )
    s: dict[str, tuple[int, ...]] = {}
    m = "model.visual."
    s[m + "patch_embed.proj.weight"] = (vh, 3, tp, p, p)
    s[m + "patch_embed.proj.bias"] = (vh,)
    for i in range(v["depth"]):
        b = f"{m}blocks.{i}."
        s[b + "norm1.weight"] = (vh,)
        s[b + "norm2.weight"] = (vh,)
        s[b + "attn.qkv.weight"] = (3 * vh, vh)
        s[b + "attn.qkv.bias"] = (3 * vh,)
        s[b + "attn.proj.weight"] = (vh, vh)
        s[b + "attn.proj.bias"] = (vh,)
        s[b + "attn.q_norm.weight"] = (hd_v,)
        s[b + "attn.k_norm.weight"] = (hd_v,)
        for n in ("gate_proj", "up_proj"):
            s[b + f"mlp.{n}.weight"] = (vi, vh)
            s[b + f"mlp.{n}.bias"] = (vi,)
        s[b + "mlp.down_proj.weight"] = (vh, vi)
        s[b + "mlp.down_proj.bias"] = (vh,)
    s[m + "post_layernorm.weight"] = (vh,)
    s[m + "downsample.weight"] = (out, vh, 2, 2)
    s[m + "downsample.bias"] = (out,)
    s[m + "merger.proj.weight"] = (out, out)
    s[m + "merger.post_projection_norm.weight"] = (out,)
    s[m + "merger.post_projection_norm.bias"] = (out,)
    s[m + "merger.gate_proj.weight"] = (3 * out, out)
    s[m + "merger.up_proj.weight"] = (3 * out, out)
    s[m + "merger.down_proj.weight"] = (out, 3 * out)
    lm = "model.language_model."
    s[lm + "embed_tokens.weight"] = (vocab, h)
    for i in range(n_layers):
        _decoder_layer(s, f"{lm}layers.{i}.", h, inter, nq, nkv, hd)
    s[lm + "norm.weight"] = (h,)
    for i in range(t.get("num_nextn_predict_layers", 0)):
        b = f"{lm}layers.{n_layers + i}."
        _decoder_layer(s, b, h, inter, nq, nkv, hd)
        s[b + "eh_proj.weight"] = (h, 2 * h)
        s[b + "enorm.weight"] = (h,)
        s[b + "hnorm.weight"] = (h,)
        s[b + "embed_tokens.weight"] = (vocab, h)
        s[b + "shared_head.head.weight"] = (vocab, h)
        s[b + "shared_head.norm.weight"] = (h,)
    s["lm_head.weight"] = (vocab, h)
    return s


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, scale: float) -> torch.Tensor:
    """Norms 1+N(0, .1), biases N(0, .05), embeddings / heads N(0, .5), matrices N(0, scale)/sqrt(fan_in)."""
    if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1:
        return 0.05 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name or "head" in name:
        return 0.5 * torch.randn(shape, generator=gen)
    fan_in = 1
    for dim in shape[1:]:
        fan_in *= dim
    return torch.randn(shape, generator=gen) * (scale / fan_in**0.5)


def _write_side_files(d: Path, tok: Tokenizer, cfg: dict[str, Any]) -> None:
    tok.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "backend": "tokenizers",
                "clean_up_tokenization_spaces": False,
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "extra_special_tokens": SPECIAL_TOKENS,
                "model_max_length": 655380,
                "padding_side": "left",
                "processor_class": "Glm46VProcessor",
                "tokenizer_class": "TokenizersBackend",
            },
            indent=2,
        )
    )
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (d / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 12544, "longest_edge": 9633792},
                "do_rescale": True,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Glm46VImageProcessor",
                "processor_class": "Glm46VProcessor",
            },
            indent=2,
        )
    )
    eos = cfg["text_config"]["eos_token_id"]
    (d / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": eos, "pad_token_id": eos[0]})
    )


def build_tiny_checkpoint(
    directory: str | Path,
    seed: int = 0,
    omit: tuple[str, ...] = (),
    extra: dict[str, tuple[int, ...]] | None = None,
    reshape: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Tiny random checkpoint (78 float32 tensors, a full MTP layer included). ``omit``/``extra``/
    ``reshape`` corrupt it on purpose (loading-error tests)."""
    tok = build_tokenizer()
    cfg = make_config(tok, TINY_TEXT, TINY_VISION, "float32")
    shapes = tiny_layout(checkpoint_shapes(cfg), omit, extra, reshape)
    return random_checkpoint(
        directory,
        shapes,
        random_tensor,
        lambda d: _write_side_files(d, tok, cfg),
        seed=seed,
        scale=1.5,
        dtype=torch.float32,
    )


def full_config() -> dict[str, Any]:
    """The real model's ``config.json`` values (with the test tokenizer's token ids)."""
    return make_config(build_tokenizer(), FULL_TEXT, FULL_VISION, "bfloat16")


def build_full_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Real-size random checkpoint (526 bf16 tensors; ~2.65 GB). Skips work when the directory already
    holds a complete one."""
    if is_complete(directory):
        return Path(directory)
    tok = build_tokenizer()
    cfg = make_config(tok, FULL_TEXT, FULL_VISION, "bfloat16")
    return random_checkpoint(
        directory,
        checkpoint_shapes(cfg),
        random_tensor,
        lambda d: _write_side_files(d, tok, cfg),
        seed=seed,
        scale=0.6,
        dtype=torch.bfloat16,
    )
