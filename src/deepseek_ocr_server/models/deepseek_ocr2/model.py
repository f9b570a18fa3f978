"""DeepSeek-OCR 2: strict loading of the original checkpoint and the engine protocol.

Module tree == original key names::

    model.embed_tokens / model.layers.{L}.* / model.norm      (v1's DeepSeek-V2 decoder, unchanged)
    model.sam_model.*                                         (v1's SAM ViT-B, net_3 -> 896 channels)
    model.qwen2_model.model.model.{layers,norm}.*             (the Qwen2-shaped encoder)
    model.qwen2_model.query_768 / query_1024                  (learned queries: 12x12 / 16x16 views)
    model.projector.layers.*  model.view_seperator (sic)      (linear 896 -> 1280; the separator)
    lm_head.weight                                            (untied)

Everything past the image embeddings (prompt layout, KV cache, batched decode, packed/fused CPU layers,
int8) is DeepSeek-OCR v1's :class:`~..deepseek_ocr.model.DeepseekOcrModel`; this family differs in its
vision path and its view sizes only.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from ..base import BetweenLayers, InputError, no_pause
from ..deepseek_ocr.language import DeepseekV2Decoder
from ..deepseek_ocr.model import DeepseekOcrModel
from ..deepseek_ocr.options import VisionSettings
from ..deepseek_ocr.processor import ImageInput
from ..deepseek_ocr.vision import Projector, SamEncoder
from . import processor
from .config import DeepseekOcr2Config
from .vision import Qwen2Encoder, arrange_image_embeddings, encode_views


class DeepseekOcr2Inner(DeepseekV2Decoder):
    """``model.``: the text stack plus SAM, the encoder, the projector and the separator."""

    def __init__(self, cfg: DeepseekOcr2Config) -> None:
        super().__init__(cfg.language)
        self.sam_model = SamEncoder(cfg.sam)
        self.qwen2_model = Qwen2Encoder(cfg.encoder)
        self.projector = Projector(cfg.encoder.hidden_size, cfg.projector_n_embed)
        self.view_seperator = nn.Parameter(torch.empty(cfg.projector_n_embed))


class DeepseekOcr2ForCausalLM(nn.Module):
    def __init__(self, cfg: DeepseekOcr2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekOcr2Inner(cfg)
        self.lm_head = nn.Linear(cfg.language.hidden_size, cfg.language.vocab_size, bias=False)

    def encode_image(
        self,
        image: ImageInput,
        dtype: torch.dtype,
        device: torch.device,
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        """Pixels -> (N, hidden) image embeddings in splice order: tiles, global view, separator."""
        m = self.model
        g = encode_views(
            m.sam_model,
            m.qwen2_model,
            m.projector,
            image.global_view.to(device=device, dtype=dtype),
            between_layers,
        )
        tiles = None
        if image.tiles is not None:
            tiles = encode_views(
                m.sam_model,
                m.qwen2_model,
                m.projector,
                image.tiles.to(device=device, dtype=dtype),
                between_layers,
            )
        return arrange_image_embeddings(g[0], tiles, m.view_seperator)


class DeepseekOcr2Model(DeepseekOcrModel):
    kind: ClassVar[str] = "deepseek-ocr-2"
    display_name: ClassVar[str] = "DeepSeek-OCR 2"
    config_class: ClassVar[Any] = DeepseekOcr2Config
    net_class: ClassVar[Any] = DeepseekOcr2ForCausalLM
    ignored_keys: ClassVar[tuple[re.Pattern[str], ...]] = ()

    def check_vision_settings(self, settings: VisionSettings) -> None:
        sides = self.config.view_tokens()
        # without crop mode only the image_size view exists (base_size is not used)
        for name in ("base_size", "image_size") if settings.crop_mode else ("image_size",):
            v = getattr(settings, name)
            if v not in sides:
                raise InputError(
                    f"{self.kind}: {name} must be one of {', '.join(map(str, sorted(sides)))} "
                    f"(the encoder has learned queries for those view sizes only), got {v}"
                )

    def preprocess_image(self, image: Image.Image, settings: VisionSettings) -> ImageInput:
        return processor.preprocess(
            image, settings.base_size, settings.image_size, settings.crop_mode, self.config.view_tokens()
        )
