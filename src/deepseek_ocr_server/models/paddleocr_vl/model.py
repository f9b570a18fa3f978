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
    SequenceCache,
    check_load_options,
    check_prompt_fits,
    no_pause,
)
from ..layers import PackedNet, prepare_for_inference, storage_dtypes
from ..precision import Precision
from ..registry import family
from ..weights import load_checkpoint
from .config import PaddleOcrVlConfig
from .language import ErnieModel, KVCache
from .processor import (
    FALLBACK_CHAT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    ImageProcessorConfig,
    ProcessedImage,
    mrope_positions,
    preprocess_image,
    render_prompt,
)
from .vision import Projector, VisualModel

#: Present in the original checkpoint but unused at inference (SPEC §10, pitfall 18).
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
#: Prompt tokens reserved for the KV cache beyond the prompt at prefill (it grows when needed).
_INITIAL_DECODE_RESERVE = 1024


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
    return Prepared(input_ids=expanded, inputs={**prepared.inputs, "positions": positions, "rope_delta": delta})


class PaddleOcrVlModel(PackedNet, OcrModel):
    kind: ClassVar[str] = "paddleocr-vl"
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
        self.config = config
        self.net = net
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.chat_template = chat_template
        self.special_tokens = special_tokens
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.precision = precision
        self.dtype = precision.compute_dtype  # the language model's activations
        self.vision_dtype = precision.vision_dtype
        self.max_context = config.max_position_embeddings
        self.cache_dtype = precision.kv_dtype

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
        with torch.device("meta"):
            net = PaddleOcrVlNet(config)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        is_vision = family(cls.kind).is_vision  # the vision side: its spec's quantize_skip
        stored, overrides = storage_dtypes(net, precision, is_vision)  # each tensor in its phase's dtype
        state = load_checkpoint(
            files.weights,
            expected,
            stored,
            overrides=overrides,
            model="PaddleOCR-VL",
            renames=_RENAMES,
            ignored=UNUSED_KEY_PATTERNS,
            tied={"lm_head.weight": "model.embed_tokens.weight"},
            device=dev,
        )
        net.load_state_dict(state, strict=True, assign=True)
        # non-persistent buffers were created on "meta": rebuild them
        lm = net.model
        d = config.head_dim
        lm.inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=dev) / d)
        )
        t, h, _ = config.mrope_section
        axis = torch.full((d // 2,), 2, dtype=torch.long, device=dev)
        axis[:t] = 0
        axis[t : t + h] = 1
        lm.rope_axis = axis
        del state  # the net holds the only reference: a replaced layer's weight is freed at once
        net.eval().requires_grad_(False)
        # int8 (decoder linears + lm_head) when asked; widening layers of the plan; oneDNN packing
        prepare_for_inference(net, precision, quantize, is_vision)

        try:
            tokenizer = Tokenizer.from_file(str(files.tokenizer))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot load tokenizer {files.tokenizer}: {e}") from e
        image_config = ImageProcessorConfig.from_dict(files.read_json("preprocessor_config.json"), cls.image_defaults)
        template_path = files.extra("chat_template.jinja")
        chat_template = template_path.read_text(encoding="utf-8") if template_path else None
        tok_cfg = files.read_json("tokenizer_config.json")
        if chat_template is None and tok_cfg and isinstance(tok_cfg.get("chat_template"), str):
            chat_template = tok_cfg["chat_template"]
        special = {k: v for k in ("cls_token", "eos_token") if (v := _special_token(tok_cfg, k))}
        eos = {config.eos_token_id}
        gen = files.read_json("generation_config.json") or {}
        g_eos = gen.get("eos_token_id")
        if isinstance(g_eos, int):
            eos.add(g_eos)
        elif isinstance(g_eos, list):
            eos.update(int(x) for x in g_eos)
        for tok_name in ("<|IMAGE_PLACEHOLDER|>",):
            if tokenizer.token_to_id(tok_name) not in (None, config.image_token_id):
                raise ModelLoadError(f"tokenizer id of {tok_name} differs from config image_token_id")
        return cls(
            config,
            net,
            tokenizer,
            image_config,
            chat_template or FALLBACK_CHAT_TEMPLATE,
            special,
            frozenset(eos),
            dev,
            precision,
        )

    # ------------------------------------------------------------------------------------ prompt

    def render(self, text: str, num_images: int, system: str | None = None) -> str:
        """The prompt string before placeholder expansion (``<image>`` markers removed)."""
        return render_prompt(
            self.chat_template,
            strip_image_markers(text, self.image_placeholder),
            num_images,
            system,
            self.special_tokens,
        )

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
        return mrope_prepared(self, ids, processed, IMAGE_PLACEHOLDER)

    def preprocess_images(self, text: str, images: list[Image.Image]) -> list[ProcessedImage]:
        """Each image resized within the checkpoint's pixel budget and cut into patches."""
        return [preprocess_image(img, self.image_config) for img in images]

    def continue_answer(self, prepared: Prepared, partial: str) -> Prepared:
        return continue_mrope_answer(self, prepared, partial)

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

    @torch.inference_mode()
    def prefill(
        self, prepared: Prepared, max_new_tokens: int, between_layers: BetweenLayers = no_pause
    ) -> tuple[torch.Tensor, SequenceCache]:
        cfg = self.config
        n = len(prepared.input_ids)
        if n == 0:
            raise InputError("empty prompt")
        check_prompt_fits(n, self.max_context)
        ids = torch.tensor(prepared.input_ids, dtype=torch.long, device=self.device)
        lm = self.net.model
        x = lm.embed_tokens(ids)
        grids = prepared.inputs.get("grids") or []
        if grids:
            feats = self.encode_images(prepared.inputs["pixel_values"], grids, between_layers)
            mask = ids == cfg.image_token_id
            if int(mask.sum()) != feats.shape[0]:
                raise InputError(f"{int(mask.sum())} image tokens but {feats.shape[0]} image features")
            x[mask] = feats.to(x.dtype)
        positions = prepared.inputs["positions"].to(self.device)
        cos, sin = lm.rope(positions, self.dtype)
        capacity = min(self.max_context, n + max(1, min(max_new_tokens, _INITIAL_DECODE_RESERVE)))
        cache = KVCache(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            capacity,
            int(prepared.inputs["rope_delta"]),
            self.cache_dtype,
            self.device,
        )
        for i, layer in enumerate(lm.layers):
            x = layer.prefill(x, cos, sin, cache, i)
            between_layers()
        cache.advance(n)
        h = lm.norm(x[-1:])
        return self.net.lm_head(h).float()[0], cache

    @torch.inference_mode()
    def decode(self, tokens: list[int], caches: list[SequenceCache]) -> torch.Tensor:
        if len(tokens) != len(caches):
            raise ValueError("one token per cache")
        kv: list[KVCache] = []
        for c in caches:
            if not isinstance(c, KVCache):
                raise TypeError("not a PaddleOCR-VL cache")
            c.reserve(c.length + 1)
            kv.append(c)
        lm = self.net.model
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        x = lm.embed_tokens(ids)  # [B, C]
        pos = torch.tensor([c.length + c.rope_delta for c in kv], dtype=torch.long, device=self.device)
        cos, sin = lm.rope(pos[None].expand(3, -1), self.dtype)
        for i, layer in enumerate(lm.layers):
            x = layer.decode(x, cos, sin, kv, i)
        for c in kv:
            c.advance()
        return self.net.lm_head(lm.norm(x)).float()
