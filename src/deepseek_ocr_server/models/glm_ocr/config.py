"""Configuration parsed from GLM-OCR's original ``config.json`` (``text_config`` and ``vision_config``
nested, as transformers saves it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import ModelLoadError


def _req(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ModelLoadError(f"{where}: missing field {key!r}")
    return d[key]


def _ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, list) else (int(v),)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    depth: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    out_hidden_size: int = 1536
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    #: Base of the 2-D rotary embedding (not in the file; the architecture's fixed value).
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        where = "config.json vision_config"
        act = str(d.get("hidden_act", "silu"))
        if act != "silu":
            raise ModelLoadError(f"{where}: unsupported hidden_act {act!r} (expected 'silu')")
        cfg = cls(
            hidden_size=int(_req(d, "hidden_size", where)),
            depth=int(_req(d, "depth", where)),
            num_heads=int(_req(d, "num_heads", where)),
            intermediate_size=int(_req(d, "intermediate_size", where)),
            out_hidden_size=int(_req(d, "out_hidden_size", where)),
            patch_size=int(d.get("patch_size", 14)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)),
            in_channels=int(d.get("in_channels", 3)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            attention_bias=bool(d.get("attention_bias", True)),
        )
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise ModelLoadError(f"{where}: head_dim must be an integer divisible by 4 (2-D rotary)")
        if cfg.spatial_merge_size != 2:
            raise ModelLoadError(f"{where}: spatial_merge_size {cfg.spatial_merge_size} is not supported (2)")
        return cfg


@dataclass(frozen=True)
class GlmOcrConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    #: Frequency counts per axis (temporal, height, width); sums to head_dim / 2.
    mrope_section: tuple[int, int, int]
    #: Multi-token-prediction layers stored after the decoder layers (``layers.<num_hidden_layers>``).
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vision: VisionConfig

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GlmOcrConfig:
        where = "config.json"
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ModelLoadError(f"{where}: 'text_config' (an object) is required")
        where_t = "config.json text_config"
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        section = rope.get("mrope_section") if isinstance(rope, dict) else None
        if section is None or len(section) != 3:
            raise ModelLoadError(f"{where_t}: rope_parameters.mrope_section (3 integers) is required")
        if (
            float(rope.get("partial_rotary_factor", 1.0)) != 1.0
            or rope.get("rope_type", "default") != "default"
        ):
            raise ModelLoadError(
                f"{where_t}: only rope_type 'default' with partial_rotary_factor 1.0 is supported"
            )
        heads = int(_req(text, "num_attention_heads", where_t))
        hidden = int(_req(text, "hidden_size", where_t))
        head_dim = int(text.get("head_dim") or hidden // heads)
        if sum(section) * 2 != head_dim:
            raise ModelLoadError(
                f"{where_t}: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}"
            )
        kv = int(text.get("num_key_value_heads") or heads)
        if heads % kv:
            raise ModelLoadError(
                f"{where_t}: num_attention_heads {heads} not a multiple of num_key_value_heads {kv}"
            )
        act = str(text.get("hidden_act", "silu"))
        if act != "silu":
            raise ModelLoadError(f"{where_t}: unsupported hidden_act {act!r} (expected 'silu')")
        if text.get("attention_bias"):
            raise ModelLoadError(f"{where_t}: attention_bias true is not supported")
        theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
        eos = _ids(text.get("eos_token_id", raw.get("eos_token_id"))) or (59246, 59253)
        return cls(
            vocab_size=int(_req(text, "vocab_size", where_t)),
            hidden_size=hidden,
            intermediate_size=int(_req(text, "intermediate_size", where_t)),
            num_hidden_layers=int(_req(text, "num_hidden_layers", where_t)),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
            rope_theta=float(theta),
            mrope_section=(int(section[0]), int(section[1]), int(section[2])),
            num_nextn_predict_layers=int(text.get("num_nextn_predict_layers", 0)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            image_token_id=int(raw.get("image_token_id", 59280)),
            image_start_token_id=int(raw.get("image_start_token_id", 59256)),
            image_end_token_id=int(raw.get("image_end_token_id", 59257)),
            eos_token_ids=eos,
            pad_token_id=int(text.get("pad_token_id", 59246)),
            vision=VisionConfig.from_dict(_req(raw, "vision_config", where)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> GlmOcrConfig:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ModelLoadError(f"config {path}: not a JSON object")
        return cls.from_dict(raw)
