"""GLM-OCR's decoder (``model.language_model.*`` + ``lm_head``): 16 layers with "sandwich" RMSNorms
(each sub-layer's output is normalised before the residual add), grouped-query attention with
head_dim 128, and a 3-axis multimodal rotary embedding applied to ADJACENT PAIRS of each head
(frequency i rotates dims 2i and 2i+1; frequencies take their position from the temporal, height or
width axis in contiguous sections).

Built from the shared toolkit (``models/common``); the prefill kernel is PaddleOCR-VL's, only the
rotation and the norms differ. The checkpoint also stores a multi-token-prediction layer after the last
decoder layer (:class:`MtpLayer`, ``layers.<num_hidden_layers>``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.blocks import Attend, DecoderLayer, DecoderStack, GatedMLP, RMSNorm
from ..common.rope import pairwise_rotary
from ..paddleocr_vl.language import ErnieAttention
from .config import GlmOcrConfig


class GlmAttention(ErnieAttention):
    """q/k/v/o without biases, GQA; the pairwise rotary instead of the half-split one."""

    rotate = staticmethod(pairwise_rotary)


class GlmDecoderLayer(DecoderLayer):
    """Sandwich norms: each sub-layer's input AND output are normalised."""

    def __init__(self, cfg: GlmOcrConfig) -> None:
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        mlp = GatedMLP(h, cfg.intermediate_size, stored_fused=True)
        super().__init__(GlmAttention(cfg), mlp, h, eps)  # type: ignore[arg-type]  # same field names
        self.post_self_attn_layernorm = RMSNorm(h, eps)
        self.post_mlp_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(attend(self.self_attn, self.input_layernorm(x)))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class SharedHead(nn.Module):
    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MtpLayer(GlmDecoderLayer):
    """The multi-token-prediction head stored as ``layers.<num_hidden_layers>``: a draft model that
    predicts the token after next from (embedding of the next token, last hidden state):
    ``enorm``/``hnorm`` on each, concatenated, ``eh_proj``, one decoder layer, ``shared_head``.

    Kept in the module tree so the strict loader checks every one of its tensors by name and shape;
    :meth:`GlmOcrModel.load` does not read its data (plain decoding never uses it; see there)."""

    def __init__(self, cfg: GlmOcrConfig) -> None:
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)


class GlmTextModel(DecoderStack):
    """``model.language_model``: embed_tokens -> layers (decoder layers, then the MTP layers) -> norm."""

    def __init__(self, cfg: GlmOcrConfig) -> None:
        layers: list[nn.Module] = [GlmDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        layers += [MtpLayer(cfg) for _ in range(cfg.num_nextn_predict_layers)]
        super().__init__(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, layers, cfg.num_hidden_layers)
