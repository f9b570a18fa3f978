"""DeepSeek-OCR (v1): strict loading of the original checkpoint and the engine protocol.

Module tree == original key names::

    model.embed_tokens / model.layers.{L}.* / model.norm      (language.DeepseekV2Decoder)
    model.sam_model.*  model.vision_model.*  model.projector.layers.*   (vision)
    model.image_newline  model.view_seperator                 (sic, SPEC §3.2)
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
    SequenceCache,
    check_load_options,
    check_prompt_fits,
    no_pause,
)
from ..layers import PackedNet, prepare_for_inference, storage_dtypes
from ..precision import Precision
from ..registry import family
from ..weights import load_checkpoint
from . import processor
from .config import DeepseekOcrConfig
from .language import DeepseekV2Decoder, KVCache, Rope
from .options import VisionSettings
from .vision import ClipVisionModel, Projector, SamEncoder, arrange_image_embeddings, encode_views

#: Keys a re-saved checkpoint may carry that the model does not use (SPEC §3.4).
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
        self.cfg = cfg
        self.model = DeepseekOcrInner(cfg)
        self.lm_head = nn.Linear(cfg.language.hidden_size, cfg.language.vocab_size, bias=False)

    def encode_image(
        self,
        image: processor.ImageInput,
        dtype: torch.dtype,
        device: torch.device,
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        """Pixels -> (N, hidden) image embeddings in splice order (SPEC §6)."""
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


class DeepseekOcrModel(PackedNet, OcrModel):
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
        cfg: Any,
        net: Any,
        tokenizer: Tokenizer,
        device: torch.device,
        precision: Precision,
        eos_token_ids: frozenset[int],
        image_token_id: int,
    ) -> None:
        self.cfg = cfg
        self.net = net
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.dtype = precision.compute_dtype  # the language model's activations
        self.vision_dtype = precision.vision_dtype
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = cfg.language.bos_token_id
        self.image_token_id = image_token_id
        self.max_context = cfg.language.max_position_embeddings
        #: KV cache dtype (the precision plan): float32 on CPU (exact for the values written; fast decode
        #: attention, see ``language.Attention.forward_decode``), the model dtype elsewhere
        self.cache_dtype = precision.kv_dtype
        self.rope = Rope(cfg.language.head_dim, cfg.language.rope_theta, self.max_context, self.dtype, device)

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
        cfg = cls.config_class.from_file(files.config)
        if not files.tokenizer.is_file():
            raise ModelLoadError(f"tokenizer file not found: {files.tokenizer}")
        try:
            tokenizer = Tokenizer.from_file(str(files.tokenizer))
        except Exception as exc:
            raise ModelLoadError(f"cannot load tokenizer {files.tokenizer}: {exc}") from exc
        image_id = tokenizer.token_to_id(cls.image_placeholder)
        if image_id is None:
            raise ModelLoadError(f"tokenizer has no {cls.image_placeholder!r} token")
        vocab = cfg.language.vocab_size
        if image_id >= vocab or cfg.language.bos_token_id >= vocab:
            raise ModelLoadError("image/BOS token id outside the embedding table")
        eos = set(cfg.language.eos_token_id)
        gen = files.read_json("generation_config.json")
        if gen and gen.get("eos_token_id") is not None:
            e = gen["eos_token_id"]
            eos = set(e) if isinstance(e, list) else {int(e)}

        # Build on the meta device; every tensor is then read once into its own storage (weights.py).
        with torch.device("meta"):
            net = cls.net_class(cfg)
        expected = {k: tuple(p.shape) for k, p in net.named_parameters()}
        is_vision = family(cls.kind).is_vision  # the vision side: its spec's quantize_skip
        stored, overrides = storage_dtypes(net, precision, is_vision)  # each tensor in its phase's dtype
        state = load_checkpoint(
            files.weights, expected, stored, model=cls.display_name, ignored=cls.ignored_keys,
            overrides=overrides, device=dev,
        )
        net.load_state_dict(state, strict=True, assign=True)
        del state  # the net holds the only reference: a replaced layer's weight is freed at once
        net.eval().requires_grad_(False)
        # int8 (decoder linears + lm_head) when asked; widening layers of the plan; oneDNN packing
        prepare_for_inference(net, precision, quantize, is_vision)
        return cls(cfg, net, tokenizer, dev, precision, frozenset(int(x) for x in eos), int(image_id))

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
        # "plain" template: the content is stripped (HF format_messages), no role tags (SPEC §7.1).
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

    # ------------------------------------------------------------- prefill
    @torch.inference_mode()
    def embed_prompt(self, prepared: Prepared, between_layers: BetweenLayers = no_pause) -> torch.Tensor:
        """Token embeddings with the image rows overwritten by the vision output (SPEC §8.1)."""
        ids = torch.tensor(prepared.input_ids, dtype=torch.long, device=self.device)
        h = self.net.model.embed_tokens(ids)
        images: list[processor.ImageInput] = prepared.inputs.get("images", [])
        if images:
            emb = torch.cat(
                [self.net.encode_image(img, self.vision_dtype, self.device, between_layers) for img in images], dim=0
            )
            mask = ids == self.image_token_id
            if int(mask.sum()) != emb.shape[0]:
                raise InputError(f"{int(mask.sum())} image placeholders but {emb.shape[0]} image embeddings")
            h[mask] = emb.to(h.dtype)
        return h

    @torch.inference_mode()
    def prefill(
        self, prepared: Prepared, max_new_tokens: int, between_layers: BetweenLayers = no_pause
    ) -> tuple[torch.Tensor, SequenceCache]:
        n = prepared.num_prompt_tokens
        check_prompt_fits(n, self.max_context)
        capacity = min(self.max_context, n + max(1, max_new_tokens))
        cache = self.net.model.new_cache(capacity, self.cache_dtype, self.device)
        h = self.embed_prompt(prepared, between_layers)
        out = self.net.model.prefill(h, cache, self.rope, between_layers)
        logits = self.net.lm_head(out[-1:]).to(torch.float32)[0]
        return logits, cache

    # -------------------------------------------------------------- decode
    @torch.inference_mode()
    def decode(self, tokens: list[int], caches: list[SequenceCache]) -> torch.Tensor:
        if len(tokens) != len(caches):
            raise ValueError("decode needs one token per cache")
        kv: list[KVCache] = []
        for c in caches:
            if not isinstance(c, KVCache):
                raise TypeError("decode got a cache that does not belong to deepseek-ocr")
            kv.append(c)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        h = self.net.model.embed_tokens(ids)
        out = self.net.model.decode(h, kv, self.rope)
        return self.net.lm_head(out).to(torch.float32)

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
