"""DeepSeek-OCR (v1): strict loading of the original checkpoint and the engine protocol.

Module tree == original key names::

    model.embed_tokens / model.layers.{L}.* / model.norm      (language.DeepseekV2Decoder)
    model.sam_model.*  model.vision_model.*  model.projector.layers.*   (vision)
    model.image_newline  model.view_seperator                 (sic: the checkpoint's spelling)
    lm_head.weight                                            (untied)
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from PIL import Image
from tokenizers import Tokenizer
from torch import nn

from ...settings import SETTINGS
from ..base import (
    BetweenLayers,
    InputError,
    ModelFiles,
    ModelLoadError,
    OcrModel,
    Prepared,
    RequestOptions,
    check_load_options,
    check_prompt_fits,
    no_pause,
)
from ..common.cache import KVCache
from ..common.loading import load_net, load_tokenizer, stop_token_ids
from ..common.model import StackModel
from ..common.rope import Rope
from ..layers import PackedNet
from ..precision import Precision
from ..registry import family
from . import processor
from .config import DeepseekOcrConfig
from .language import DeepseekV2Decoder
from .options import VisionSettings
from .vision import ClipVisionModel, Projector, SamEncoder, arrange_image_embeddings, encode_views

#: Keys a re-saved checkpoint may carry that the model does not use (CLIP's position-id buffer).
IGNORED_KEYS = (re.compile(r"^model\.vision_model\.embeddings\.position_ids$"),)


class DeepseekOcrInner(DeepseekV2Decoder):
    """``model.``: the text stack plus the vision towers, projector and the two special embeddings."""

    def __init__(self, cfg: DeepseekOcrConfig) -> None:
        super().__init__(cfg.language)
        self.sam_model = SamEncoder(cfg.sam)
        self.vision_model = ClipVisionModel(cfg.clip)
        self.projector = Projector(cfg.projector_input_dim, cfg.projector_n_embed)
        self.image_newline = nn.Parameter(torch.empty(cfg.projector_n_embed))
        self.view_seperator = nn.Parameter(torch.empty(cfg.projector_n_embed))


class DeepseekOcrForCausalLM(nn.Module):
    def __init__(self, cfg: DeepseekOcrConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekOcrInner(cfg)
        self.lm_head = nn.Linear(cfg.language.hidden_size, cfg.language.vocab_size, bias=False)

    def encode_image(
        self,
        image: processor.ImageInput,
        dtype: torch.dtype,
        device: torch.device,
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        """Pixels -> (N, hidden) image embeddings in splice order (tiles mosaic with a newline embedding
        after each row, then the global view likewise, then the view separator)."""
        m = self.model
        g = encode_views(
            m.sam_model, m.vision_model, m.projector, image.global_view.to(device=device, dtype=dtype), between_layers
        )
        tiles = None
        if image.tiles is not None:
            tiles = encode_views(
                m.sam_model, m.vision_model, m.projector, image.tiles.to(device=device, dtype=dtype), between_layers
            )
        return arrange_image_embeddings(g[0], tiles, image.grid, m.image_newline, m.view_seperator)


# ---------------------------------------------------------------------------------- the protocol


class DeepseekOcrModel(StackModel, PackedNet, OcrModel):
    """The engine protocol over a DeepSeek-V2 decoder with image embeddings spliced into the prompt.

    DeepSeek-OCR 2 (``deepseek_ocr2.model``) reuses all of it; a family differs in the class
    attributes below and in :meth:`check_vision_settings` / :meth:`preprocess_image`."""

    kind: ClassVar[str] = "deepseek-ocr"
    #: ``load`` takes a per-phase precision plan (``models/precision.py``)
    precision_plans: ClassVar[bool] = True
    #: the family's name in error messages
    display_name: ClassVar[str] = "DeepSeek-OCR"
    config_class: ClassVar[Any] = DeepseekOcrConfig
    net_class: ClassVar[Any] = DeepseekOcrForCausalLM
    ignored_keys: ClassVar[tuple[re.Pattern[str], ...]] = IGNORED_KEYS

    def __init__(
        self,
        config: Any,
        net: Any,
        tokenizer: Tokenizer,
        device: torch.device,
        precision: Precision,
        eos_token_ids: frozenset[int],
        image_token_id: int,
    ) -> None:
        lc = config.language
        self.bind(config, net, tokenizer, eos_token_ids, device, precision, lc.max_position_embeddings)
        self.bos_token_id = lc.bos_token_id
        self.image_token_id = image_token_id
        self.rope = Rope(lc.head_dim, lc.rope_theta, self.max_context, self.dtype, device)

    # ---------------------------------------------------------------- load
    @classmethod
    def load(
        cls,
        files: ModelFiles,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | Precision | None = None,
        quantize: str | None = None,
    ) -> DeepseekOcrModel:
        dev = torch.device(device)
        precision = check_load_options(cls.kind, dtype, quantize, dev)
        config = cls.config_class.from_file(files.config)
        tokenizer = load_tokenizer(files.tokenizer)
        image_id = tokenizer.token_to_id(cls.image_placeholder)
        if image_id is None:
            raise ModelLoadError(f"tokenizer has no {cls.image_placeholder!r} token")
        vocab = config.language.vocab_size
        if image_id >= vocab or config.language.bos_token_id >= vocab:
            raise ModelLoadError("image/BOS token id outside the embedding table")
        eos = stop_token_ids(config.language.eos_token_id, files)
        net = load_net(
            lambda: cls.net_class(config),
            files,
            precision,
            quantize,
            dev,
            model=cls.display_name,
            ignored=cls.ignored_keys,
            is_vision=family(cls.kind).is_vision,  # the vision side: its spec's quantize_skip
        )
        return cls(config, net, tokenizer, dev, precision, eos, int(image_id))

    # ------------------------------------------------------------- prepare
    def prepare(
        self,
        text: str,
        images: list[Image.Image],
        settings: RequestOptions | VisionSettings | None = None,
        system: str | None = None,
    ) -> Prepared:
        settings = VisionSettings.of(settings)
        marker = self.image_placeholder
        if len(images) > 1:
            raise InputError(
                f"{self.kind} serves at most one image per request, got {len(images)} "
                "(the model reads a single image per prompt)"
            )
        if system and marker in system:
            raise InputError(f"the system message must not contain the image marker {marker}")
        n_markers = text.count(marker)
        if n_markers > len(images):
            raise InputError(f"prompt has {n_markers} {marker} markers but {len(images)} image(s) were given")
        # "plain" template: the content is stripped (HF format_messages), no role tags.
        text = text.strip()
        if n_markers < len(images):
            text = f"{marker}\n" * (len(images) - n_markers) + text
        if system and system.strip():
            text = system.strip() + "\n" + text
        self.check_vision_settings(settings)
        pre: list[processor.ImageInput] = []
        for img in images:
            try:
                pre.append(self.preprocess_image(img, settings))
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot process image: {exc}") from exc
        ids = [self.bos_token_id]
        pieces = text.split(marker)
        for i, piece in enumerate(pieces):
            if piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False).ids)
            if i < len(pieces) - 1:
                ids.extend([self.image_token_id] * pre[i].num_tokens)
        check_prompt_fits(len(ids), self.max_context)
        return Prepared(input_ids=ids, inputs={"images": pre})

    def check_vision_settings(self, settings: VisionSettings) -> None:
        """Raise :class:`InputError` for view sizes the model cannot serve."""
        for name in ("base_size", "image_size"):
            v = getattr(settings, name)
            lo, hi = int(SETTINGS[name].lo or 0), int(SETTINGS[name].hi or 0)  # the setting's range
            if v < max(lo, processor.PIXELS_PER_TOKEN) or v % processor.PIXELS_PER_TOKEN or v > hi:
                step = processor.PIXELS_PER_TOKEN
                raise InputError(f"{name} must be a multiple of {step} between {max(lo, step)} and {hi}, got {v}")

    def preprocess_image(self, image: Image.Image, settings: VisionSettings) -> processor.ImageInput:
        """One image -> its views and image-token count (``OSError``/``ValueError`` for a bad image)."""
        return processor.preprocess(image, settings.base_size, settings.image_size, settings.crop_mode)

    # ------------------------------------------------------------- prefill / decode (common.model)
    def embed_prompt(self, prepared: Prepared, between_layers: BetweenLayers = no_pause) -> torch.Tensor:
        """Token embeddings with the image rows overwritten by the vision output (in placeholder order)."""
        ids = torch.tensor(prepared.input_ids, dtype=torch.long, device=self.device)
        h = self.net.model.embed_tokens(ids)
        images: list[processor.ImageInput] = prepared.inputs.get("images", [])
        if images:
            emb = torch.cat(
                [self.net.encode_image(img, self.vision_dtype, self.device, between_layers) for img in images],
                dim=0,
            )
            self.splice_images(ids, h, self.image_token_id, emb)
        return h

    def prompt_rope(self, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(torch.arange(prepared.num_prompt_tokens, device=self.device))

    def step_rope(self, caches: list[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(torch.tensor([c.length for c in caches], device=self.device))

    # ------------------------------------------------------------- helpers
    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dtype": str(self.dtype).removeprefix("torch."),
            "precision": self.precision.as_dict(),
            "device": str(self.device),
            "max_context": self.max_context,
            "image_token_id": self.image_token_id,
        }
