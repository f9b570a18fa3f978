"""Rotary position embeddings: the tables and the three ways the families rotate a head.

- :class:`Rope`: cos/sin tables over the full head dim (``[freqs, freqs]``) for positions 0..max-1,
  used with :func:`rotate_half_rotary` (DeepSeek-OCR's decoder and the DeepSeek-OCR 2 encoder).
- :class:`MultimodalRope`: 3-axis positions (temporal, height, width): frequency slot ``j`` takes its
  position from one axis, in contiguous sections; cos/sin of half the head dim, used with
  :func:`half_split_rotary` (PaddleOCR-VL) or :func:`pairwise_rotary` (GLM-OCR).

Angles are computed in float32 and cast to the activation dtype.
"""

from __future__ import annotations

import torch


def inverse_frequencies(
    head_dim: int, theta: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """``1 / theta^(2i/d)`` for i = 0..d/2-1, float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotate_half_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with full-width ``cos``/``sin`` (``[freqs, freqs]``)."""
    return x * cos + rotate_half(x) * sin


def half_split_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("neox") rotary: ``x*[cos,cos] + rotate_half(x)*[sin,sin]`` with ``cos``/``sin`` given for
    the first half only (both halves of the angle vector are the same), i.e.
    ``[x1*cos - x2*sin, x2*cos + x1*sin]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def pairwise_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: ``(x[2i], x[2i+1])`` by angle i, with ``cos``/``sin`` given per pair
    (``[..., head_dim/2]``, broadcast over the leading dims)."""
    xp = x.unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


class Rope:
    """cos/sin tables (float32 math, cast to the activation dtype) for positions 0..max-1, full head
    width (each frequency twice: ``[freqs, freqs]``)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, dtype, device) -> None:  # noqa: ANN001
        inv_freq = inverse_frequencies(head_dim, theta)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


class MultimodalRope:
    """3-axis rotary angles: ``positions [3, S]`` (t, h, w) -> cos, sin ``[S, head_dim/2]``; frequency
    slot j takes its position from axis ``axis[j]``: the first ``sections[0]`` slots from t, the next
    ``sections[1]`` from h, the rest from w."""

    def __init__(
        self, head_dim: int, theta: float, sections: tuple[int, ...], device: torch.device | str
    ) -> None:
        self.inv_freq = inverse_frequencies(head_dim, theta, device)
        t, h = sections[0], sections[1]
        axis = torch.full((head_dim // 2,), 2, dtype=torch.long, device=device)
        axis[:t] = 0
        axis[t : t + h] = 1
        self.axis = axis

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.float()  # [3, S]
        ang = pos.gather(0, self.axis[:, None].expand(-1, pos.shape[1]))  # [d/2, S]
        ang = ang.T * self.inv_freq  # [S, d/2]
        return ang.cos().to(dtype), ang.sin().to(dtype)
