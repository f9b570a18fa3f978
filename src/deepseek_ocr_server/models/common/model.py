"""The engine protocol's ``prefill`` and ``decode`` over a :class:`~.blocks.DecoderStack`, written once.

A family's model class mixes :class:`StackModel` in and says where its stack and output layer are, how a
prompt becomes input embeddings (token embeddings with the image rows spliced in) and which rotary
tables its positions use; the cache handling, the layer loop and the logits are the same for all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import BetweenLayers, InputError, Prepared, SequenceCache, check_prompt_fits, no_pause
from ..precision import Precision
from .blocks import DecoderStack
from .cache import KVCache, initial_capacity


class StackModel:
    """``prefill`` / ``decode`` for a family whose decoder is a :class:`DecoderStack`.

    The family provides :meth:`embed_prompt`, :meth:`prompt_rope` and :meth:`step_rope`, plus the
    attributes every model has (``net``, ``device``, ``dtype``, ``cache_dtype``, ``max_context``, ``kind``);
    its stack is ``net.model`` and its output layer ``net.lm_head`` unless it says otherwise."""

    net: nn.Module

    device: torch.device
    dtype: torch.dtype
    cache_dtype: torch.dtype
    max_context: int
    kind: str

    @property
    def stack(self) -> DecoderStack:
        return self.net.model

    @property
    def lm_head(self) -> nn.Module:
        return self.net.lm_head

    def embed_prompt(self, prepared: Prepared, between_layers: BetweenLayers = no_pause) -> torch.Tensor:
        """The prompt's input embeddings ``[T, hidden]`` (image rows replaced by the vision output; the
        vision encoders call ``between_layers`` after each of their layers)."""
        raise NotImplementedError

    def prompt_rope(self, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the prompt's positions."""
        raise NotImplementedError

    def step_rope(self, caches: list[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the next position of each cache (``length + rope_delta``)."""
        raise NotImplementedError

    def bind(
        self,
        config: Any,
        net: nn.Module,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        device: torch.device,
        precision: Precision,
        max_context: int,
    ) -> None:
        """Set what every model holds: its config, network, tokenizer, stop ids, device, context and
        the dtypes of its precision plan (``dtype``: the language model's activations; ``cache_dtype``:
        the KV cache, float32 on CPU)."""
        self.config = config
        self.net = net
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.precision = precision
        self.dtype = precision.compute_dtype
        self.vision_dtype = precision.vision_dtype
        self.cache_dtype = precision.kv_dtype
        self.max_context = max_context

    def splice_images(self, ids: torch.Tensor, h: torch.Tensor, image_id: int, feats: torch.Tensor) -> None:
        """Overwrite, in place, the rows of ``h`` whose token is ``image_id`` by ``feats`` (in order)."""
        mask = ids == image_id
        if int(mask.sum()) != feats.shape[0]:
            raise InputError(f"{int(mask.sum())} image tokens but {feats.shape[0]} image features")
        h[mask] = feats.to(h.dtype)

    @torch.inference_mode()
    def prefill(
        self, prepared: Prepared, max_new_tokens: int, between_layers: BetweenLayers = no_pause
    ) -> tuple[torch.Tensor, SequenceCache]:
        n = prepared.num_prompt_tokens
        if n == 0:
            raise InputError("empty prompt")
        check_prompt_fits(n, self.max_context)
        h = self.embed_prompt(prepared, between_layers)
        cos, sin = self.prompt_rope(prepared)
        cache = self.stack.new_cache(
            initial_capacity(n, max_new_tokens, self.max_context),
            self.cache_dtype,
            self.device,
            limit=self.max_context,
            rope_delta=int(prepared.inputs.get("rope_delta", 0)),
        )
        out = self.stack.prefill(h, cos, sin, cache, between_layers)
        return self.lm_head(out[-1:]).float()[0], cache

    @torch.inference_mode()
    def decode(self, tokens: list[int], caches: list[SequenceCache]) -> torch.Tensor:
        if len(tokens) != len(caches):
            raise ValueError("decode needs one token per cache")
        kv: list[KVCache] = []
        for c in caches:
            if not isinstance(c, KVCache):
                raise TypeError(f"decode got a cache that does not belong to {self.kind}")
            kv.append(c)
        h = self.stack.embed_tokens(torch.tensor(tokens, dtype=torch.long, device=self.device))
        out = self.stack.decode(h, *self.step_rope(kv), kv)
        return self.lm_head(out).float()
