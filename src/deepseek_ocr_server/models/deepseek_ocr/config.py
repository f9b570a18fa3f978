"""DeepSeek-OCR configuration, parsed from the checkpoint's ORIGINAL ``config.json`` (the language model's fields nested under ``language_config`` and copied flat at the top level).

Keys read
---------
Language model (HF remote code reads the TOP-LEVEL flat copy; we do the same and fall back to
``language_config`` for a key missing at top level, then to the ``DeepseekV2Config`` default):
``vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
intermediate_size, moe_intermediate_size, n_routed_experts, n_shared_experts, num_experts_per_tok,
first_k_dense_replace, moe_layer_freq, topk_method, norm_topk_prob, routed_scaling_factor, scoring_func,
hidden_act, rms_norm_eps, rope_theta, rope_scaling, attention_bias, max_position_embeddings,
bos_token_id, eos_token_id, use_mla``.

Vision (``vision_config.width``; the reference hard-codes these values, which agree with the file):
``sam_vit_b.{width, layers, heads, global_attn_indexes, downsample_channels}`` and
``clip-l-14-224.{width, layers, heads, patch_size, image_size}``. Keys the original file does NOT have
but a (tiny test) config may set: ``sam_vit_b.{image_size (1024), patch_size (16), window_size (14),
out_chans (256), mlp_dim (4*width)}`` and ``clip-l-14-224.mlp_dim (4*width)``. ``mlp_ratio`` at the
``vision_config`` level (3.7362) is NOT used by the reference and is ignored here.

Projector: ``projector_config.{projector_type ("linear" only), input_dim, n_embed}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base import ModelLoadError

# DeepseekV2Config defaults used when a key is absent (the values of transformers' configuration class).
_LM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "routed_scaling_factor": 1.0,
    "topk_method": "greedy",
    "n_group": None,
    "topk_group": None,
    "num_experts_per_tok": None,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "use_mla": True,
}


@dataclass(frozen=True)
class SamConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    downsample_channels: tuple[int, int] = (512, 1024)
    image_size: int = 1024  # pretraining size: pos_embed grid = image_size / patch_size
    patch_size: int = 16
    window_size: int = 14
    out_chans: int = 256
    mlp_dim: int = 3072

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ClipConfig:
    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    mlp_dim: int = 4096

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class LanguageConfig:
    vocab_size: int = 129280
    hidden_size: int = 1280
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: tuple[int, ...] = (1,)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        # HF-V2 DeepseekV2DecoderLayer.__init__
        return (
            self.n_routed_experts is not None
            and self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )


@dataclass(frozen=True)
class DeepseekOcrConfig:
    language: LanguageConfig = field(default_factory=LanguageConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    projector_input_dim: int = 2048
    projector_n_embed: int = 1280

    @classmethod
    def from_file(cls, path: str | Path) -> DeepseekOcrConfig:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read DeepSeek-OCR config {path}: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeepseekOcrConfig:
        language = language_from_dict(raw)
        widths = (raw.get("vision_config") or {}).get("width") or {}
        sam = sam_from_dict(widths.get("sam_vit_b") or {})
        c = widths.get("clip-l-14-224") or {}
        clip_width = int(c.get("width", 1024))
        clip = ClipConfig(
            width=clip_width,
            layers=int(c.get("layers", 24)),
            heads=int(c.get("heads", 16)),
            patch_size=int(c.get("patch_size", 14)),
            image_size=int(c.get("image_size", 224)),
            mlp_dim=int(c.get("mlp_dim", 4 * clip_width)),
        )
        p = raw.get("projector_config") or {}
        if p.get("projector_type", "linear") != "linear":
            raise ModelLoadError(f"unsupported projector_type {p.get('projector_type')!r} (only 'linear')")
        cfg = cls(
            language=language,
            sam=sam,
            clip=clip,
            projector_input_dim=int(p.get("input_dim", 2048)),
            projector_n_embed=int(p.get("n_embed", language.hidden_size)),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        s, c = self.sam, self.clip
        if len(s.downsample_channels) != 2:
            raise ModelLoadError("sam_vit_b.downsample_channels must have two entries")
        if s.downsample_channels[1] != c.width:
            raise ModelLoadError(
                f"SAM output channels {s.downsample_channels[1]} must equal the CLIP width {c.width} "
                "(the SAM map is CLIP's patch embedding)"
            )
        if self.projector_input_dim != c.width + s.downsample_channels[1]:
            raise ModelLoadError("projector input_dim must equal CLIP width + SAM channels (the projector reads both, concatenated)")
        if self.projector_n_embed != self.language.hidden_size:
            raise ModelLoadError("projector n_embed must equal the language hidden_size")
        if s.width % s.heads or c.width % c.heads:
            raise ModelLoadError("vision widths must be divisible by their head counts")


def language_from_dict(raw: dict[str, Any]) -> LanguageConfig:
    """The DeepSeek-V2 decoder settings of an original config.json: the top-level flat copy first, then
    ``language_config``, then the ``DeepseekV2Config`` default (shared by DeepSeek-OCR and DeepSeek-OCR 2)."""
    lang_nested = raw.get("language_config") or {}

    def lm(key: str) -> Any:
        if key in raw and raw[key] is not None:
            return raw[key]
        if key in lang_nested and lang_nested[key] is not None:
            return lang_nested[key]
        return _LM_DEFAULTS[key]

    if lm("use_mla"):
        raise ModelLoadError(
            "config has use_mla=true: only the DeepSeek-OCR (non-MLA) decoder is supported"
        )
    if lm("scoring_func") != "softmax" or lm("topk_method") != "greedy":
        raise ModelLoadError(
            f"unsupported MoE routing scoring_func={lm('scoring_func')!r} topk_method={lm('topk_method')!r}"
        )
    if lm("hidden_act") != "silu":
        raise ModelLoadError(f"unsupported hidden_act {lm('hidden_act')!r}")
    if lm("rope_scaling"):
        raise ModelLoadError("rope_scaling is not supported")
    eos = lm("eos_token_id")
    eos_t = tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)
    n_heads = int(lm("num_attention_heads"))
    kv = lm("num_key_value_heads")
    language = LanguageConfig(
        vocab_size=int(lm("vocab_size")),
        hidden_size=int(lm("hidden_size")),
        num_hidden_layers=int(lm("num_hidden_layers")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(kv) if kv is not None else n_heads,
        intermediate_size=int(lm("intermediate_size")),
        moe_intermediate_size=int(lm("moe_intermediate_size")),
        n_routed_experts=int(lm("n_routed_experts") or 0),
        n_shared_experts=int(lm("n_shared_experts") or 0),
        num_experts_per_tok=int(lm("num_experts_per_tok") or 0),
        first_k_dense_replace=int(lm("first_k_dense_replace")),
        moe_layer_freq=int(lm("moe_layer_freq")),
        topk_method=str(lm("topk_method")),
        norm_topk_prob=bool(lm("norm_topk_prob")),
        routed_scaling_factor=float(lm("routed_scaling_factor")),
        scoring_func=str(lm("scoring_func")),
        hidden_act=str(lm("hidden_act")),
        rms_norm_eps=float(lm("rms_norm_eps")),
        rope_theta=float(lm("rope_theta")),
        attention_bias=bool(lm("attention_bias")),
        max_position_embeddings=int(lm("max_position_embeddings")),
        bos_token_id=int(lm("bos_token_id")),
        eos_token_id=eos_t,
    )
    if language.hidden_size % language.num_attention_heads:
        raise ModelLoadError("hidden_size must be divisible by num_attention_heads")
    if language.num_key_value_heads != language.num_attention_heads:
        raise ModelLoadError(
            "DeepSeek-OCR uses plain MHA; num_key_value_heads must equal num_attention_heads"
        )
    return language


def sam_from_dict(s: dict[str, Any]) -> SamConfig:
    """``vision_config.width.sam_vit_b`` of an original config.json (shared by DeepSeek-OCR and DeepSeek-OCR 2)."""
    sam_width = int(s.get("width", 768))
    return SamConfig(
        width=sam_width,
        layers=int(s.get("layers", 12)),
        heads=int(s.get("heads", 12)),
        global_attn_indexes=tuple(int(i) for i in s.get("global_attn_indexes", (2, 5, 8, 11))),
        downsample_channels=tuple(int(c) for c in s.get("downsample_channels", (512, 1024))),  # type: ignore[arg-type]
        image_size=int(s.get("image_size", 1024)),
        patch_size=int(s.get("patch_size", 16)),
        window_size=int(s.get("window_size", 14)),
        out_chans=int(s.get("out_chans", 256)),
        mlp_dim=int(s.get("mlp_dim", 4 * sam_width)),
    )
