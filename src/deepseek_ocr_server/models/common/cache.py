"""The KV cache of one sequence and the decode-step attention over it.

:class:`KVCache` holds every layer's keys (after the rotary embedding) and values of one sequence:
``k``, ``v`` of shape ``[layers, kv_heads, capacity, head_dim]``. It starts at the prompt plus a bounded
reserve for the answer (:data:`INITIAL_DECODE_RESERVE`) and grows geometrically (capacity doubled, never
per token) up to the model's context. Why growth and not one allocation of prompt + ``max_new_tokens``:
most answers stop long before their budget, and a budget of 8,192 tokens (GLM-OCR's default) would
otherwise hold ~1 GB of float32 cache per DeepSeek-OCR sequence from the first step; a doubling costs
one copy of what is there, amortised over as many steps as the cache held before.

:func:`decode_attention` is one query position per sequence, each over its own cache (sequences of a
batched decode step have different lengths): the package's CPU kernel where it is built (every
sequence in two calls per layer), else a plain matmul-softmax-matmul per row, fast at query length 1
where SDPA is not on CPU. The KV cache dtype comes from the precision plan: float32 on CPU, where torch's
float32 batched matmuls run at once while bfloat16 ones make oneDNN compile a kernel for every new cache
length (6-16 ms per step); bfloat16 where the plan computes in bf16 and the kernel reads the cache.
"""

from __future__ import annotations

import torch

from .. import cpukernels
from ..base import SequenceCache

#: positions reserved for the answer beyond the prompt when a cache is created (it grows when needed)
INITIAL_DECODE_RESERVE = 1024


def initial_capacity(prompt: int, max_new_tokens: int, limit: int) -> int:
    """Positions a new cache holds for a prompt of ``prompt`` tokens: the prompt plus at most
    :data:`INITIAL_DECODE_RESERVE` answer tokens (at least one), never more than ``limit``."""
    return min(limit, prompt + max(1, min(max_new_tokens, INITIAL_DECODE_RESERVE)))


class KVCache(SequenceCache):
    """Keys and values of one sequence for every layer, growing geometrically up to ``limit`` positions.

    ``rope_delta`` turns a cache position into the rotary position of the token written there
    (``position = length + rope_delta``): 0 where positions are token indices, the offset of the
    multimodal positions after the images otherwise."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        limit: int | None = None,
        rope_delta: int = 0,
    ) -> None:
        self.k: torch.Tensor | None = torch.empty(
            layers, kv_heads, capacity, head_dim, dtype=dtype, device=device
        )
        self.v: torch.Tensor | None = torch.empty_like(self.k)
        self.limit = limit
        self.rope_delta = rope_delta
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        if self.k is None:
            return 0
        return self.k.shape[2]

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions (doubling the capacity, bounded by ``limit``)."""
        if self.k is None or self.v is None:
            raise RuntimeError("decode on a released cache")
        if needed <= self.capacity:
            return
        if self.limit is not None and needed > self.limit:
            raise ValueError(f"the sequence reached the model's context of {self.limit} positions")
        new_cap = max(needed, self.capacity * 2)
        if self.limit is not None:
            new_cap = min(new_cap, self.limit)
        shape = (*self.k.shape[:2], new_cap, self.k.shape[3])
        k = torch.empty(shape, dtype=self.k.dtype, device=self.k.device)
        v = torch.empty_like(k)
        k[:, :, : self._length] = self.k[:, :, : self._length]
        v[:, :, : self._length] = self.v[:, :, : self._length]
        self.k, self.v = k, v

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``T`` new positions of ``layer`` (k, v: ``[kv_heads, T, head_dim]``) after the cached
        ones; returns that layer's keys and values up to them (``[kv_heads, length + T, head_dim]``)."""
        if self.k is None or self.v is None:
            raise RuntimeError("prefill on a released cache")
        start, end = self._length, self._length + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"{k.shape[1]} tokens do not fit the cache ({self.capacity - start} free)")
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int = 1) -> None:
        self._length += n

    def release(self) -> None:
        self.k = None
        self.v = None


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caches: list[KVCache], layer: int, scale: float
) -> torch.Tensor:
    """One decode step of attention for B sequences: q ``[B, heads, d]``, the new k/v ``[B, kv_heads, d]``
    (written at each cache's current length) -> ``[B, heads * d]`` in the cache dtype. The kernel's path
    computes in float32 whatever the cache stores; torch's path in the cache dtype, as follows.

    Grouped-query attention folds the ``heads / kv_heads`` query heads of a kv head into the rows of
    one matmul instead of repeating k/v. Every row's query is cast to the cache dtype and scaled at once;
    the scores go through a float32 softmax, then back to the cache dtype for the second matmul."""
    b, heads, d = q.shape
    kv_heads = k.shape[1]
    dtype = caches[0].k.dtype if caches[0].k is not None else q.dtype
    if dtype in cpukernels.CACHE_DTYPES and all(c.k is not None and c.v is not None for c in caches):
        # the package's CPU kernel: the new k/v written and every sequence's attention in two calls, the
        # cache read at memory speed (None when it is not built or does not take the call); float32
        # query, products and output whatever the cache stores
        qf = q.view(b, kv_heads, heads // kv_heads, d).to(torch.float32) * scale
        out = cpukernels.decode_attention(
            qf, k.to(torch.float32), v.to(torch.float32), [c.k[layer] for c in caches],
            [c.v[layer] for c in caches], [c.length for c in caches],
        )  # fmt: skip
        if out is not None:
            return out.view(b, heads * d).to(dtype)
    qs = q.view(b, kv_heads, heads // kv_heads, d).to(dtype) * scale
    outs = []
    for i, cache in enumerate(caches):
        if cache.k is None or cache.v is None:
            raise RuntimeError("decode on a released cache")
        pos = cache.length
        kc, vc = cache.k[layer], cache.v[layer]
        kc[:, pos] = k[i]
        vc[:, pos] = v[i]
        scores = torch.bmm(qs[i], kc[:, : pos + 1].transpose(1, 2)).float()  # [kv_heads, G, L]
        p = torch.softmax(scores, dim=-1).to(vc.dtype)
        outs.append(torch.bmm(p, vc[:, : pos + 1]).reshape(-1))
    return torch.stack(outs)
