"""DeepSeek-OCR 2 configuration, parsed from the checkpoint's ORIGINAL ``config.json``.

The file has the layout of DeepSeek-OCR v1 (``model_type "deepseek_vl_v2"``, nested ``language_config``
plus a flat top-level copy); the language keys are read exactly as for v1
(:func:`..deepseek_ocr.config.language_from_dict`).

Vision (``vision_config.width``):

- ``sam_vit_b``: as v1 (:func:`..deepseek_ocr.config.sam_from_dict`), except that the output width of
  ``net_3`` is the encoder width (896). The file's ``downsample_channels [512, 1024]`` is stale (the
  released checkpoint's ``net_3`` has 896 output channels), so only its first entry is read.
- ``qwen2-0-5b``: the original file has only ``dim`` (896); the reference hard-codes the rest of the
  Qwen2-0.5B shape. A (tiny test) config may also set ``layers`` (24), ``heads`` (14), ``kv_heads`` (2),
  ``intermediate_size`` (4864), ``rms_norm_eps`` (1e-6) and ``rope_theta`` (1e6).

Projector: ``projector_config.{projector_type ("linear" only), input_dim (= encoder width), n_embed}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..base import ModelLoadError
from ..deepseek_ocr.config import LanguageConfig, SamConfig, language_from_dict, sam_from_dict

#: learned query tables of the encoder: one per view size, named by the view's pixel side at the real
#: patch size (16 px, then two stride-2 convs: 64 px per token): 12 x 12 and 16 x 16 queries
QUERY_TABLES: dict[str, int] = {"query_768": 144, "query_1024": 256}


@dataclass(frozen=True)
class EncoderConfig:
    """The Qwen2-0.5B-shaped transformer used as the vision encoder (no token embedding, no LM head)."""

    hidden_size: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads


@dataclass(frozen=True)
class DeepseekOcr2Config:
    language: LanguageConfig = field(default_factory=LanguageConfig)
    sam: SamConfig = field(default_factory=lambda: SamConfig(downsample_channels=(512, 896)))
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector_n_embed: int = 1280

    @property
    def pixels_per_token(self) -> int:
        """View pixels per image token along a side: the SAM patch, then two stride-2 convs."""
        return self.sam.patch_size * 4

    def view_tokens(self) -> dict[int, int]:
        """Supported view sides (pixels) -> image tokens of one such view (one learned query each)."""
        out = {}
        for n in QUERY_TABLES.values():
            side = int(round(n**0.5))
            out[side * self.pixels_per_token] = n
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> DeepseekOcr2Config:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read DeepSeek-OCR 2 config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"DeepSeek-OCR 2 config {path} is not a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeepseekOcr2Config:
        language = language_from_dict(raw)
        widths = (raw.get("vision_config") or {}).get("width") or {}
        q = widths.get("qwen2-0-5b") or {}
        encoder = EncoderConfig(
            hidden_size=int(q.get("dim", 896)),
            layers=int(q.get("layers", 24)),
            heads=int(q.get("heads", 14)),
            kv_heads=int(q.get("kv_heads", 2)),
            intermediate_size=int(q.get("intermediate_size", 4864)),
            rms_norm_eps=float(q.get("rms_norm_eps", 1e-6)),
            rope_theta=float(q.get("rope_theta", 1_000_000.0)),
        )
        sam = sam_from_dict(widths.get("sam_vit_b") or {})
        # net_3 feeds the encoder: its width is the encoder's (the file's second entry is stale)
        sam = replace(sam, downsample_channels=(sam.downsample_channels[0], encoder.hidden_size))
        p = raw.get("projector_config") or {}
        if p.get("projector_type", "linear") != "linear":
            raise ModelLoadError(f"unsupported projector_type {p.get('projector_type')!r} (only 'linear')")
        if int(p.get("input_dim", encoder.hidden_size)) != encoder.hidden_size:
            raise ModelLoadError(
                f"projector input_dim {p.get('input_dim')} must equal the encoder width {encoder.hidden_size}"
            )
        cfg = cls(
            language=language,
            sam=sam,
            encoder=encoder,
            projector_n_embed=int(p.get("n_embed", language.hidden_size)),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        e = self.encoder
        if e.hidden_size % e.heads or e.heads % e.kv_heads or e.head_dim % 2:
            raise ModelLoadError(
                f"encoder: {e.heads} heads / {e.kv_heads} KV heads do not divide width {e.hidden_size}"
            )
        if self.projector_n_embed != self.language.hidden_size:
            raise ModelLoadError("projector n_embed must equal the language hidden_size")
        if self.sam.width % self.sam.heads:
            raise ModelLoadError("SAM width must be divisible by its head count")
