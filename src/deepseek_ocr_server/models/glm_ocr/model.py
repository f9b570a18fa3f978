"""GLM-OCR behind the :class:`~..base.OcrModel` protocol: strict loading of the original checkpoint,
prompt preparation, prefill and batched decode."""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from PIL import Image
from tokenizers import Tokenizer
from torch import nn

from ..base import (
    ModelFiles,
    ModelLoadError,
    OcrModel,
    Prepared,
    VisionSettings,
    check_load_options,
)
from ..common.cache import KVCache
from ..common.loading import load_net, load_tokenizer, stop_token_ids
from ..common.model import StackModel
from ..common.rope import MultimodalRope
from ..layers import PackedNet, weight_bytes
from ..paddleocr_vl.model import continue_mrope_answer, mrope_prepared
from ..precision import Precision
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


class GlmOcrModel(StackModel, PackedNet, OcrModel):
    kind: ClassVar[str] = "glm-ocr"
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
        self.config = config
        self.net = net
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.precision = precision
        self.dtype = precision.compute_dtype  # the language model's activations
        self.vision_dtype = precision.vision_dtype
        self.max_context = config.max_position_embeddings
        self.cache_dtype = precision.kv_dtype
        self.rope = MultimodalRope(config.head_dim, config.rope_theta, config.mrope_section, device)
        self._account_weights()

    def _account_weights(self) -> None:
        """Every decode step reads the decoder linears and lm_head once (``last_decode_weight_bytes``)."""
        lm = self.net.model.language_model
        self.decode_weight_bytes = sum(weight_bytes(m) for m in (*lm.decoder_layers(), self.net.lm_head))

    def step_weight_bytes(self) -> int:
        return self.decode_weight_bytes

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
        tied = {"lm_head.weight": "model.language_model.embed_tokens.weight"} if config.tie_word_embeddings else {}

        def drop_mtp(net: nn.Module) -> None:  # the MTP layers: checked by name and shape, not kept
            del net.model.language_model.layers[config.num_hidden_layers :]

        net = load_net(
            lambda: GlmOcrNet(config), files, precision, quantize, dev,
            model="GLM-OCR", tied=tied, unread=mtp_pattern(config), prune=drop_mtp,
        )
        tokenizer = load_tokenizer(files.tokenizer)
        if tokenizer.token_to_id(IMAGE_TOKEN) != config.image_token_id:
            raise ModelLoadError(f"tokenizer id of {IMAGE_TOKEN} differs from config image_token_id")
        image_config = ImageProcessorConfig.from_dict(files.read_json("preprocessor_config.json"))
        template_path = files.extra("chat_template.jinja")
        chat_template = template_path.read_text(encoding="utf-8") if template_path else None
        tok_cfg = files.read_json("tokenizer_config.json") or {}
        if chat_template is None and isinstance(tok_cfg.get("chat_template"), str):
            chat_template = tok_cfg["chat_template"]
        eos = stop_token_ids(config.eos_token_ids, files)
        return cls(
            config,
            net,
            tokenizer,
            image_config,
            chat_template or FALLBACK_CHAT_TEMPLATE,
            eos,
            dev,
            precision,
        )

    # ------------------------------------------------------------------------------------ prompt

    def render(self, text: str, num_images: int, system: str | None = None) -> str:
        """The prompt string before placeholder expansion."""
        return render_prompt(
            self.chat_template, build_messages(text, num_images, system, self.image_placeholder)
        )

    def prepare(
        self,
        text: str,
        images: list[Image.Image],
        settings: VisionSettings | None = None,
        system: str | None = None,
    ) -> Prepared:
        processed = [preprocess_image(img, self.image_config) for img in images]
        prompt = self.render(text, len(images), system)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return mrope_prepared(self, ids, processed, IMAGE_TOKEN)

    def continue_answer(self, prepared: Prepared, partial: str) -> Prepared:
        return continue_mrope_answer(self, prepared, partial)

    # ------------------------------------------------------------------------------------ forward

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Vision tower + merger: ``[sum(t*gh*gw/4), hidden]`` in the vision dtype."""
        return self.net.model.visual(pixel_values.to(self.device, self.vision_dtype), grids)

    @property
    def stack(self) -> GlmTextModel:
        return self.net.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.net.lm_head

    def embed_prompt(self, prepared: Prepared) -> torch.Tensor:
        ids = torch.tensor(prepared.input_ids, dtype=torch.long, device=self.device)
        h = self.stack.embed_tokens(ids)
        grids = prepared.inputs.get("grids") or []
        if grids:
            feats = prepared.inputs.get("image_features")  # precomputed by encode_images (benchmarks)
            if feats is None:
                feats = self.encode_images(prepared.inputs["pixel_values"], grids)
            self.splice_images(ids, h, self.config.image_token_id, feats)
        return h

    def prompt_rope(self, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(prepared.inputs["positions"].to(self.device), self.dtype)

    def step_rope(self, caches: list[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.tensor([c.length + c.rope_delta for c in caches], dtype=torch.long, device=self.device)
        return self.rope(pos[None].expand(3, -1), self.dtype)
