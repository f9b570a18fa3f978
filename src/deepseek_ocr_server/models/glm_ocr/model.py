"""GLM-OCR behind the :class:`~..base.OcrModel` protocol: strict loading of the original checkpoint,
prompt preparation, prefill and batched decode."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from PIL import Image
from tokenizers import Tokenizer
from torch import nn

from ..base import (
    BetweenLayers,
    ModelFiles,
    ModelLoadError,
    OcrModel,
    check_load_options,
    no_pause,
)
from ..common.loading import chat_template, load_net, load_tokenizer, stop_token_ids
from ..common.rope import MultimodalRope
from ..layers import PackedNet
from ..paddleocr_vl.model import MultimodalRopeModel
from ..precision import Precision
from ..registry import family
from .config import GlmOcrConfig
from .language import GlmTextModel
from .processor import (
    FALLBACK_CHAT_TEMPLATE,
    IMAGE_TOKEN,
    ImageProcessorConfig,
    build_messages,
    preprocess_image,
    render_prompt,
)
from .vision import VisionModel


class GlmOcrInner(nn.Module):
    """``model``: the vision tower and the decoder."""

    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__()
        self.visual = VisionModel(cfg.vision)
        self.language_model = GlmTextModel(cfg)


class GlmOcrNet(nn.Module):
    """The whole network; module names are the checkpoint's keys."""

    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__()
        self.model = GlmOcrInner(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


def mtp_pattern(cfg: GlmOcrConfig) -> re.Pattern[str]:
    """Keys of the multi-token-prediction layers (``model.language_model.layers.<n>.`` for n >= layers)."""
    first = cfg.num_hidden_layers
    idx = "|".join(str(first + i) for i in range(cfg.num_nextn_predict_layers)) or "(?!)"
    return re.compile(rf"^model\.language_model\.layers\.({idx})\.")


class GlmOcrModel(MultimodalRopeModel, PackedNet, OcrModel):
    kind: ClassVar[str] = "glm-ocr"
    image_token: ClassVar[str] = IMAGE_TOKEN
    #: ``load`` takes a per-phase precision plan (``models/precision.py``)
    precision_plans: ClassVar[bool] = True

    def __init__(
        self,
        config: GlmOcrConfig,
        net: GlmOcrNet,
        tokenizer: Tokenizer,
        image_config: ImageProcessorConfig,
        chat_template: str,
        eos_token_ids: frozenset[int],
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.bind(config, net, tokenizer, eos_token_ids, device, precision, config.max_position_embeddings)
        self.image_config = image_config
        self.chat_template = chat_template
        self.rope = MultimodalRope(config.head_dim, config.rope_theta, config.mrope_section, device)

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        files: ModelFiles,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | Precision | None = None,
        quantize: str | None = None,
    ) -> GlmOcrModel:
        """Strict: every checkpoint tensor must exist under its name with its shape, the MTP layer's
        included. The MTP layer's DATA is not read and its module is dropped after the check: plain
        greedy decoding never runs it, and it would hold 218M parameters (436 MB in bf16) for nothing.
        (Using it as a speculative draft would need a multi-token step in the engine's decode protocol.)"""
        dev = torch.device(device)
        precision = check_load_options(cls.kind, dtype, quantize, dev)
        config = GlmOcrConfig.from_file(files.config)
        if config.vision.out_hidden_size != config.hidden_size:
            raise ModelLoadError(
                f"config.json: vision out_hidden_size {config.vision.out_hidden_size} != text hidden_size "
                f"{config.hidden_size}"
            )
        tied = (
            {"lm_head.weight": "model.language_model.embed_tokens.weight"}
            if config.tie_word_embeddings
            else {}
        )

        def drop_mtp(net: nn.Module) -> None:  # the MTP layers: checked by name and shape, not kept
            del net.model.language_model.layers[config.num_hidden_layers :]

        net = load_net(
            lambda: GlmOcrNet(config),
            files,
            precision,
            quantize,
            dev,
            model="GLM-OCR",
            is_vision=family(cls.kind).is_vision,  # the vision side: its spec's quantize_skip
            tied=tied,
            unread=mtp_pattern(config),
            prune=drop_mtp,
        )
        tokenizer = load_tokenizer(files.tokenizer)
        if tokenizer.token_to_id(IMAGE_TOKEN) != config.image_token_id:
            raise ModelLoadError(f"tokenizer id of {IMAGE_TOKEN} differs from config image_token_id")
        image_config = ImageProcessorConfig.from_dict(files.read_json("preprocessor_config.json"))
        template = chat_template(files)
        eos = stop_token_ids(config.eos_token_ids, files)
        return cls(
            config,
            net,
            tokenizer,
            image_config,
            template or FALLBACK_CHAT_TEMPLATE,
            eos,
            dev,
            precision,
        )

    # ------------------------------------------------------------------------------------ prompt

    def preprocess_image(self, image: Image.Image) -> Any:
        return preprocess_image(image, self.image_config)

    def render(self, text: str, num_images: int, system: str | None = None) -> str:
        """The prompt string before placeholder expansion."""
        return render_prompt(
            self.chat_template, build_messages(text, num_images, system, self.image_placeholder)
        )

    # ------------------------------------------------------------------------------------ forward

    @torch.inference_mode()
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        grids: list[tuple[int, int, int]],
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        """Vision tower + merger: ``[sum(t*gh*gw/4), hidden]`` in the vision dtype."""
        return self.net.model.visual(pixel_values.to(self.device, self.vision_dtype), grids, between_layers)

    @property
    def stack(self) -> GlmTextModel:
        return self.net.model.language_model
