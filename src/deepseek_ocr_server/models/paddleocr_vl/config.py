"""Configuration parsed from the checkpoint's original ``config.json`` (flat layout: text fields at the top level, the vision tower under ``vision_config``).

The original file keeps the language-model fields at the top level and the vision fields in
``vision_config``. A transformers-5 style file (``text_config`` nested) is accepted as well: its
``text_config`` entries are merged over the top level.
"""

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


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    spatial_merge_size: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    #: Not in the config: base of the vision 2-D rotary embedding (the reference hard-codes it).
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        where = "config.json vision_config"
        cfg = cls(
            hidden_size=int(_req(d, "hidden_size", where)),
            intermediate_size=int(_req(d, "intermediate_size", where)),
            num_hidden_layers=int(_req(d, "num_hidden_layers", where)),
            num_attention_heads=int(_req(d, "num_attention_heads", where)),
            num_channels=int(d.get("num_channels", 3)),
            image_size=int(d.get("image_size", 384)),
            patch_size=int(d.get("patch_size", 14)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)),
            hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh")),
        )
        if cfg.hidden_act != "gelu_pytorch_tanh":
            raise ModelLoadError(
                f"{where}: unsupported hidden_act {cfg.hidden_act!r} (expected 'gelu_pytorch_tanh')"
            )
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise ModelLoadError(
                f"{where}: head_dim must be an integer divisible by 4 for the 2-D rotary embedding"
            )
        return cfg


@dataclass(frozen=True)
class PaddleOcrVlConfig:
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
    #: Frequency-pair counts per axis (temporal, height, width); sums to head_dim / 2.
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    vision: VisionConfig
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PaddleOcrVlConfig:
        d = dict(raw)
        if isinstance(d.get("text_config"), dict):  # transformers-5 nested layout
            d.update(d["text_config"])
        where = "config.json"
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        section = rope.get("mrope_section") if isinstance(rope, dict) else None
        if section is None or len(section) != 3:
            raise ModelLoadError(f"{where}: rope_scaling.mrope_section (3 integers) is required")
        heads = int(_req(d, "num_attention_heads", where))
        hidden = int(_req(d, "hidden_size", where))
        head_dim = int(d.get("head_dim") or hidden // heads)
        if sum(section) * 2 != head_dim:
            raise ModelLoadError(f"{where}: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
        rope_theta = d.get("rope_theta")
        if rope_theta is None and isinstance(rope, dict):
            rope_theta = rope.get("rope_theta")
        vision_raw = _req(d, "vision_config", where)
        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        kv = int(d.get("num_key_value_heads") or heads)
        if heads % kv:
            raise ModelLoadError(
                f"{where}: num_attention_heads {heads} not a multiple of num_key_value_heads {kv}"
            )
        act = str(d.get("hidden_act", "silu"))
        if act != "silu":
            raise ModelLoadError(f"{where}: unsupported hidden_act {act!r} (expected 'silu')")
        return cls(
            vocab_size=int(_req(d, "vocab_size", where)),
            hidden_size=hidden,
            intermediate_size=int(_req(d, "intermediate_size", where)),
            num_hidden_layers=int(_req(d, "num_hidden_layers", where)),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            rope_theta=float(rope_theta if rope_theta is not None else 500000.0),
            mrope_section=(int(section[0]), int(section[1]), int(section[2])),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            image_token_id=int(d.get("image_token_id", 100295)),
            vision_start_token_id=int(d.get("vision_start_token_id", 101305)),
            vision_end_token_id=int(d.get("vision_end_token_id", 101306)),
            bos_token_id=int(d.get("bos_token_id", 1)),
            eos_token_id=int(eos),
            pad_token_id=int(d.get("pad_token_id", 0)),
            vision=VisionConfig.from_dict(vision_raw),
            hidden_act=act,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> PaddleOcrVlConfig:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(raw)
