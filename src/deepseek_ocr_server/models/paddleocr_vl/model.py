"""PaddleOCR-VL behind the :class:`~..base.OcrModel` protocol: strict loading of the original checkpoint,
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
from ..common.loading import chat_template, load_net, load_tokenizer, stop_token_ids
from ..common.model import StackModel
from ..common.rope import MultimodalRope
from ..layers import PackedNet
from ..precision import Precision
from ..registry import family
from .config import PaddleOcrVlConfig
from .language import ErnieModel
from .processor import (
    FALLBACK_CHAT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    ImageProcessorConfig,
    mrope_positions,
    preprocess_image,
    render_prompt,
)
from .vision import Projector, VisualModel

#: Present in the original checkpoint but unused at inference: the packed-sequence position table (the
#: vision tower interpolates the learned 2-D table instead) and the SigLIP pooling head.
UNUSED_KEY_PATTERNS = (
    re.compile(r"^visual\.vision_model\.embeddings\.packing_position_embedding\.weight$"),
    re.compile(r"^visual\.vision_model\.head\."),
)
#: transformers-5 names -> original names (checkpoints re-saved by transformers).
_RENAMES = (
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.projector\."), "mlp_AR."),
    (re.compile(r"^model\.language_model\."), "model."),
)


class PaddleOcrVlNet(nn.Module):
    """The whole network, module names mirroring the original checkpoint keys."""

    def __init__(self, cfg: PaddleOcrVlConfig) -> None:
        super().__init__()
        self.visual = VisualModel(cfg.vision)
        self.mlp_AR = Projector(cfg)
        self.model = ErnieModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


def strip_image_markers(text: str, marker: str) -> str:
    """Remove ``marker``s (the template puts images first anyway) with one newline right after each, and
    leading whitespace: ``"<image>\nOCR:"`` -> ``"OCR:"`` (the trained prompt)."""
    return re.sub(re.escape(marker) + r"\r?\n?", "", text).lstrip()


def _special_token(cfg: dict[str, Any] | None, name: str) -> str | None:
    if not cfg or name not in cfg:
        return None
    v = cfg[name]
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def mrope_prepared(model: Any, ids: list[int], processed: list[Any], placeholder: str) -> Prepared:
    """The prompt of a family with 3-D (multimodal) rope positions (PaddleOCR-VL, GLM-OCR): each image
    placeholder id of the rendered prompt ``ids`` expanded to its image's tokens, and the positions
    computed over the result. ``placeholder`` names the marker in the error for a text that holds one."""
    image_id = model.config.image_token_id
    at = [i for i, t in enumerate(ids) if t == image_id]
    if len(at) != len(processed):
        raise InputError(
            f"the prompt has {len(at)} image placeholders for {len(processed)} images "
            f"(the text must not contain {placeholder})"
        )
    expanded: list[int] = []
    prev = 0
    for i, img in zip(at, processed, strict=True):
        expanded.extend(ids[prev:i])
        expanded.extend([image_id] * img.num_tokens)
        prev = i + 1
    expanded.extend(ids[prev:])
    check_prompt_fits(len(expanded), model.max_context)
    grids = [img.grid_thw for img in processed]
    positions, delta = mrope_positions(expanded, grids, image_id, model.config.vision.spatial_merge_size)
    inputs: dict[str, Any] = {"grids": grids, "positions": positions, "rope_delta": delta}
    if processed:
        inputs["pixel_values"] = torch.cat([p.pixel_values for p in processed])
    return Prepared(input_ids=expanded, inputs=inputs)


def continue_mrope_answer(model: Any, prepared: Prepared, partial: str) -> Prepared:
    """``OcrModel.continue_answer`` for a family with 3-D (multimodal) rope positions computed in
    ``prepare`` (PaddleOCR-VL, GLM-OCR): the answer start is appended and the positions are recomputed
    from the ids, so that they cover it too."""
    ids = model.tokenizer.encode(partial, add_special_tokens=False).ids if partial else []
    expanded = [*prepared.input_ids, *ids]
    check_prompt_fits(len(expanded), model.max_context)
    grids = prepared.inputs["grids"]
    positions, delta = mrope_positions(
        expanded, grids, model.config.image_token_id, model.config.vision.spatial_merge_size
    )
    return Prepared(
        input_ids=expanded, inputs={**prepared.inputs, "positions": positions, "rope_delta": delta}
    )


class MultimodalRopeModel(StackModel):
    """:class:`~..common.model.StackModel` for a family whose prompts :func:`mrope_prepared` builds
    (PaddleOCR-VL, GLM-OCR): image features spliced at the image tokens, 3-axis rotary positions for
    the prompt, ``length + rope_delta`` on every axis for a decode step."""

    config: Any
    rope: MultimodalRope
    tokenizer: Any
    image_config: Any
    #: the image token of the rendered prompt (named in the error for a text that holds it)
    image_token: ClassVar[str]

    def render(self, text: str, num_images: int, system: str | None = None) -> str:
        """The prompt string, one image token per image, before each is expanded to its image's tokens."""
        raise NotImplementedError

    def preprocess_image(self, image: Image.Image) -> Any:
        """One image -> its patches and grid (``pixel_values``, ``grid_thw``, ``num_tokens``)."""
        raise NotImplementedError

    def preprocess_images(self, text: str, images: list[Image.Image]) -> list[Any]:
        """Each image resized within the checkpoint's pixel budget and cut into patches (a family may
        make it depend on the prompt: PaddleOCR-VL 1.5's spotting)."""
        return [self.preprocess_image(img) for img in images]

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        grids: list[tuple[int, int, int]],
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        raise NotImplementedError

    def prepare(
        self,
        text: str,
        images: list[Image.Image],
        settings: RequestOptions | None = None,
        system: str | None = None,
    ) -> Prepared:
        processed = self.preprocess_images(text, images)
        prompt = self.render(text, len(images), system)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return mrope_prepared(self, ids, processed, self.image_token)

    def continue_answer(self, prepared: Prepared, partial: str) -> Prepared:
        return continue_mrope_answer(self, prepared, partial)

    def embed_prompt(self, prepared: Prepared, between_layers: BetweenLayers = no_pause) -> torch.Tensor:
        ids = torch.tensor(prepared.input_ids, dtype=torch.long, device=self.device)
        h = self.stack.embed_tokens(ids)
        grids = prepared.inputs.get("grids") or []
        if grids:
            feats = self.encode_images(prepared.inputs["pixel_values"], grids, between_layers)
            self.splice_images(ids, h, self.config.image_token_id, feats)
        return h

    def prompt_rope(self, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(prepared.inputs["positions"].to(self.device), self.dtype)

    def step_rope(self, caches: list[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.tensor([c.length + c.rope_delta for c in caches], dtype=torch.long, device=self.device)
        return self.rope(pos[None].expand(3, -1), self.dtype)


class PaddleOcrVlModel(MultimodalRopeModel, PackedNet, OcrModel):
    kind: ClassVar[str] = "paddleocr-vl"
    image_token: ClassVar[str] = IMAGE_PLACEHOLDER
    #: ``load`` takes a per-phase precision plan (``models/precision.py``)
    precision_plans: ClassVar[bool] = True
    #: the image preprocessing of a checkpoint whose ``preprocessor_config.json`` does not say
    image_defaults: ClassVar[ImageProcessorConfig] = ImageProcessorConfig()

    def __init__(
        self,
        config: PaddleOcrVlConfig,
        net: PaddleOcrVlNet,
        tokenizer: Tokenizer,
        image_config: ImageProcessorConfig,
        chat_template: str,
        special_tokens: dict[str, str],
        eos_token_ids: frozenset[int],
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.bind(config, net, tokenizer, eos_token_ids, device, precision, config.max_position_embeddings)
        self.image_config = image_config
        self.chat_template = chat_template
        self.special_tokens = special_tokens
        self.rope = MultimodalRope(config.head_dim, config.rope_theta, config.mrope_section, device)

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        files: ModelFiles,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | Precision | None = None,
        quantize: str | None = None,
    ) -> PaddleOcrVlModel:
        dev = torch.device(device)
        precision = check_load_options(cls.kind, dtype, quantize, dev)
        config = PaddleOcrVlConfig.from_file(files.config)
        net = load_net(
            lambda: PaddleOcrVlNet(config),
            files,
            precision,
            quantize,
            dev,
            model="PaddleOCR-VL",
            is_vision=family(cls.kind).is_vision,  # the vision side: its spec's quantize_skip
            renames=_RENAMES,
            ignored=UNUSED_KEY_PATTERNS,
            tied={"lm_head.weight": "model.embed_tokens.weight"},
        )
        tokenizer = load_tokenizer(files.tokenizer)
        image_config = ImageProcessorConfig.from_dict(files.read_json("preprocessor_config.json"), cls.image_defaults)
        template = chat_template(files)
        tok_cfg = files.read_json("tokenizer_config.json")
        special = {k: v for k in ("cls_token", "eos_token") if (v := _special_token(tok_cfg, k))}
        eos = stop_token_ids([config.eos_token_id], files)
        for tok_name in ("<|IMAGE_PLACEHOLDER|>",):
            if tokenizer.token_to_id(tok_name) not in (None, config.image_token_id):
                raise ModelLoadError(f"tokenizer id of {tok_name} differs from config image_token_id")
        return cls(
            config,
            net,
            tokenizer,
            image_config,
            template or FALLBACK_CHAT_TEMPLATE,
            special,
            eos,
            dev,
            precision,
        )

    # ------------------------------------------------------------------------------------ prompt

    def preprocess_image(self, image: Image.Image) -> Any:
        return preprocess_image(image, self.image_config)

    def render(self, text: str, num_images: int, system: str | None = None) -> str:
        """The prompt string before placeholder expansion (``<image>`` markers removed)."""
        return render_prompt(
            self.chat_template,
            strip_image_markers(text, self.image_placeholder),
            num_images,
            system,
            self.special_tokens,
        )

    # ------------------------------------------------------------------------------------ forward

    @torch.inference_mode()
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        grids: list[tuple[int, int, int]],
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        """Vision encoder + projector: ``[sum(t*gh*gw/4), hidden]`` in the model dtype."""
        pv = pixel_values.to(self.device, self.vision_dtype)
        feats = self.net.visual.vision_model(pv, grids, between_layers)
        return self.net.mlp_AR(feats, grids)
