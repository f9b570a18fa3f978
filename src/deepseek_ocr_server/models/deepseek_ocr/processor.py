"""DeepSeek-OCR image preprocessing and prompt construction (global view letter-boxed, optional local tiles, image-token layout, the plain prompt).

Follows the HF remote-code path (``infer()``): tile candidates 2..9, the literal 640 threshold, the
"plain" template with ``.strip()``, BOS + pieces + N image tokens, no EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

#: Both sides <= this -> no local tiles, whatever the mode parameters (the first step of the reference's tile choice).
TILE_THRESHOLD = 640
#: HF ``dynamic_preprocess`` defaults (vLLM uses 2..6).
MIN_CROPS = 2
MAX_CROPS = 9
#: Letter-box fill: int(0.5 * 255) = 127 (not 128, not black: the reference's mean colour truncated).
FILL = (127, 127, 127)
#: Image side = this * tokens per side (patch 16, then two stride-2 convs).
PIXELS_PER_TOKEN = 64


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF transpose, then RGB as the reference does (alpha dropped, not composited).

    16-bit / 32-bit integer and float greyscale images are scaled to 8 bits first (Pillow's
    ``convert('RGB')`` would clip them to 255 instead).
    """
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image)
        if image.mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            arr = arr.astype(np.int64) >> 8 if arr.max() > 255 else arr.astype(np.int64)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    """``ImageOps.pad(image, (size, size), color=FILL)`` with Pillow's defaults (BICUBIC, centred).

    Same arithmetic as Pillow's ``contain`` + ``pad`` (what the reference calls), except that a side is clamped to
    >= 1 px where Pillow would fail or return an empty image.
    """
    w, h = image.size
    if w == h:
        return image.resize((size, size), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (size, size), FILL)
    if w > h:
        new_h = max(1, round(h / w * size))
        image = image.resize((size, new_h), Image.Resampling.BICUBIC)
        out.paste(image, (0, round((size - new_h) * 0.5)))
    else:
        new_w = max(1, round(w / h * size))
        image = image.resize((new_w, size), Image.Resampling.BICUBIC)
        out.paste(image, (round((size - new_w) * 0.5), 0))
    return out


def candidate_grids(min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> list[tuple[int, int]]:
    """Tile grids (columns, rows) in the reference's order: a Python set sorted by the product
    (stable sort, ties in set iteration order, as the reference's set + sort gives them)."""
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def choose_grid(width: int, height: int, tile: int = 640, max_num: int = MAX_CROPS) -> tuple[int, int]:
    """``find_closest_aspect_ratio`` of the reference: strict improvement, or an exact tie that is
    taken only when ``W*H > 0.5 * tile^2 * i * j`` (the reference's tie-break towards more tiles)."""
    aspect = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for i, j in candidate_grids(MIN_CROPS, max_num):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff = diff
            best = (i, j)
        elif diff == best_diff and area > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def tile_grid(width: int, height: int, tile: int = 640) -> tuple[int, int]:
    """(nw, nh) in crop mode; (1, 1) means no local tiles."""
    if width <= TILE_THRESHOLD and height <= TILE_THRESHOLD:
        return (1, 1)
    return choose_grid(width, height, tile)


def num_image_tokens(grid: tuple[int, int], global_size: int, tile_size: int) -> int:
    """N = q_b(q_b+1) + 1 + [tiled](nh*q)(nw*q+1): each view's rows of q tokens plus one newline token
    per row, and one view separator."""
    qb = global_size // PIXELS_PER_TOKEN
    n = qb * (qb + 1) + 1
    nw, nh = grid
    if nw > 1 or nh > 1:
        q = tile_size // PIXELS_PER_TOKEN
        n += (nh * q) * (nw * q + 1)
    return n


def normalize(image: Image.Image) -> torch.Tensor:
    """uint8 RGB -> (x/255 - 0.5)/0.5, CHW float32, rounded through bf16 as the reference's cast
    (the reference rounds its pixels to bf16; done in every dtype so that f32 runs see its values)."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    x = arr.permute(2, 0, 1).to(torch.float32).div_(255.0)
    x = (x - 0.5) / 0.5
    return x.to(torch.bfloat16).to(torch.float32)


@dataclass
class ImageInput:
    """One preprocessed image: the global view, the local tiles (or None) and the grid."""

    global_view: torch.Tensor  # (1, 3, S, S) float32
    tiles: torch.Tensor | None  # (nw*nh, 3, s, s) float32
    grid: tuple[int, int]  # (nw, nh)
    num_tokens: int


def preprocess(image: Image.Image, base_size: int, image_size: int, crop_mode: bool) -> ImageInput:
    """Global view (letter-boxed) + tiles (the chosen grid, each tile stretched), as the HF path does."""
    image = to_rgb(image)
    w, h = image.size
    if crop_mode:
        grid = tile_grid(w, h, image_size)
        global_view = pad_to_square(image, base_size)
        tiles = None
        nw, nh = grid
        if nw > 1 or nh > 1:
            resized = image.resize((image_size * nw, image_size * nh), Image.Resampling.BICUBIC)
            crops = []
            for k in range(nw * nh):
                c, r = k % nw, k // nw
                box = (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
                crops.append(normalize(resized.crop(box)))
            tiles = torch.stack(crops)
        global_size = base_size
    else:
        grid = (1, 1)
        tiles = None
        # HF non-crop branch: stretch for image_size <= 640, letter-box otherwise; the global view
        # has image_size (base_size is not used in this branch of the HF path).
        if image_size <= TILE_THRESHOLD:
            global_view = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        else:
            global_view = pad_to_square(image, image_size)
        global_size = image_size
    return ImageInput(
        global_view=normalize(global_view).unsqueeze(0),
        tiles=tiles,
        grid=grid,
        num_tokens=num_image_tokens(grid, global_size, image_size),
    )
