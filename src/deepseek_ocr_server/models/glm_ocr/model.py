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
from ..paddleocr_vl.model import continue_mrope_answer, mrope_prepared
from ..precision import Precision
from ..registry import family
from ..weights import match_layout, read_headers, read_tensors, weight_files
from .config import GlmOcrConfig
from .language import GlmKVCache, GlmTextModel
from .processor import (
    FALLBACK_CHAT_TEMPLATE,
    IMAGE_TOKEN,
    ImageProcessorConfig,
    build_messages,
    preprocess_image,
    render_prompt,
)
from .vision import VisionModel

#: Prompt tokens reserved for the KV cache beyond the prompt at prefill (it grows when needed).
_INITIAL_DECODE_RESERVE = 1024


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


class GlmOcrModel(PackedNet, OcrModel):
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
        with torch.device("meta"):
            net = GlmOcrNet(config)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        tied = (
            {"lm_head.weight": "model.language_model.embed_tokens.weight"}
            if config.tie_word_embeddings
            else {}
        )
        plan = match_layout(
            read_headers(weight_files(files.weights)),
            expected,
            source=files.weights,
            model="GLM-OCR",
            tied=tied,
        )
        mtp = mtp_pattern(config)
        is_vision = family(cls.kind).is_vision  # the vision side: its spec's quantize_skip
        stored, overrides = storage_dtypes(net, precision, is_vision)  # each tensor in its phase's dtype
        wanted = {k: e for k, e in plan.items() if not mtp.search(k)}
        state = read_tensors(wanted, stored, overrides, device=dev)
        for name, src in tied.items():
            state.setdefault(name, state[src])
        lm = net.model.language_model
        del lm.layers[config.num_hidden_layers :]  # the MTP layers: checked above, not kept
        net.load_state_dict(state, strict=True, assign=True)
        lm.rebuild_buffers(dev)
        del state  # the net holds the only reference: a replaced layer's weight is freed at once
        net.eval().requires_grad_(False)
        # int8 (decoder linears + lm_head) when asked; widening layers of the plan; oneDNN packing
        prepare_for_inference(net, precision, quantize, is_vision)

        try:
            tokenizer = Tokenizer.from_file(str(files.tokenizer))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot load tokenizer {files.tokenizer}: {e}") from e
        if tokenizer.token_to_id(IMAGE_TOKEN) != config.image_token_id:
            raise ModelLoadError(f"tokenizer id of {IMAGE_TOKEN} differs from config image_token_id")
        image_config = ImageProcessorConfig.from_dict(files.read_json("preprocessor_config.json"))
        template_path = files.extra("chat_template.jinja")
        chat_template = template_path.read_text(encoding="utf-8") if template_path else None
        tok_cfg = files.read_json("tokenizer_config.json") or {}
        if chat_template is None and isinstance(tok_cfg.get("chat_template"), str):
            chat_template = tok_cfg["chat_template"]
        eos = set(config.eos_token_ids)
        gen = files.read_json("generation_config.json") or {}
        g_eos = gen.get("eos_token_id")
        if isinstance(g_eos, int):
            eos.add(g_eos)
        elif isinstance(g_eos, list):
            eos.update(int(x) for x in g_eos)
        return cls(
            config,
            net,
            tokenizer,
            image_config,
            chat_template or FALLBACK_CHAT_TEMPLATE,
            frozenset(eos),
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
        settings: RequestOptions | None = None,
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
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        grids: list[tuple[int, int, int]],
        between_layers: BetweenLayers = no_pause,
    ) -> torch.Tensor:
        """Vision tower + merger: ``[sum(t*gh*gw/4), hidden]`` in the vision dtype."""
        return self.net.model.visual(pixel_values.to(self.device, self.vision_dtype), grids, between_layers)

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
        lm = self.net.model.language_model
        x = lm.embed_tokens(ids)
        grids = prepared.inputs.get("grids") or []
        if grids:
            feats = self.encode_images(prepared.inputs["pixel_values"], grids, between_layers)
            mask = ids == cfg.image_token_id
            if int(mask.sum()) != feats.shape[0]:
                raise InputError(f"{int(mask.sum())} image tokens but {feats.shape[0]} image features")
            x[mask] = feats.to(x.dtype)
        cos, sin = lm.rope(prepared.inputs["positions"].to(self.device), self.dtype)
        capacity = min(self.max_context, n + max(1, min(max_new_tokens, _INITIAL_DECODE_RESERVE)))
        cache = GlmKVCache(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            capacity,
            int(prepared.inputs["rope_delta"]),
            self.cache_dtype,
            self.device,
        )
        for i, layer in enumerate(lm.decoder_layers):
            x = layer.prefill(x, cos, sin, cache, i)
            between_layers()
        cache.advance(n)
        return self.net.lm_head(lm.norm(x[-1:])).float()[0], cache

    @torch.inference_mode()
    def decode(self, tokens: list[int], caches: list[SequenceCache]) -> torch.Tensor:
        if len(tokens) != len(caches):
            raise ValueError("one token per cache")
        kv: list[GlmKVCache] = []
        for c in caches:
            if not isinstance(c, GlmKVCache):
                raise TypeError("not a GLM-OCR cache")
            c.reserve(c.length + 1)
            kv.append(c)
        lm = self.net.model.language_model
        x = lm.embed_tokens(torch.tensor(tokens, dtype=torch.long, device=self.device))  # [B, C]
        pos = torch.tensor([c.length + c.rope_delta for c in kv], dtype=torch.long, device=self.device)
        cos, sin = lm.rope(pos[None].expand(3, -1), self.dtype)
        for i, layer in enumerate(lm.decoder_layers):
            x = layer.decode(x, cos, sin, kv, i)
        for c in kv:
            c.advance()
        return self.net.lm_head(lm.norm(x)).float()
