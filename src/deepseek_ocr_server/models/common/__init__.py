"""The toolkit every model family is built from: one of each piece, so a family folder only holds
what is its own (its config, processor, vision tower and the few lines where its decoder differs).

The shape of a language model here::

    DecoderStack (blocks.py)      embed_tokens -> layers -> norm; THE prefill / decode layer loop
      DecoderLayer                pre-norm residual block (a family may re-arrange the norms)
        Attention                 q/k/v fused at load, the family's rotary (rope.py) and prefill kernel,
                                  the shared decode step over a KVCache (cache.py)
        GatedMLP / a family MoE   gate/up fused at load
      RMSNorm
    KVCache (cache.py)            one sequence's keys/values, grows geometrically up to the context
    StackModel (model.py)         the engine protocol's prefill / decode over the stack, written once

Fusion (fused.py) happens once at load with one forward path, while ``state_dict()`` and the strict loader
keep the checkpoint's own key names; loading.py is the one family-loading helper (tokenizer, stop ids,
meta build, strict load, int8, precision plan, packing). ``models/layers.py`` holds the linear-layer
storage forms (oneDNN-packed, widening) the loader turns layers into.
"""

from __future__ import annotations

from .blocks import Attention, DecoderLayer, DecoderStack, GatedMLP, RMSNorm
from .cache import INITIAL_DECODE_RESERVE, KVCache, decode_attention
from .fused import checkpoint_names, fuse_state_dict, fused_linear

__all__ = [
    "INITIAL_DECODE_RESERVE",
    "Attention",
    "DecoderLayer",
    "DecoderStack",
    "GatedMLP",
    "KVCache",
    "RMSNorm",
    "checkpoint_names",
    "decode_attention",
    "fuse_state_dict",
    "fused_linear",
]
