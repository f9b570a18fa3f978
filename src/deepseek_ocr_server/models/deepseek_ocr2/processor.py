"""DeepSeek-OCR 2 image preprocessing: the global view, the 768-px tiles and the image-token count.

The reference's (HF remote code ``infer()`` and the official vLLM processor) rules, which are v1's with
other numbers: tiles of ``image_size`` pixels (768 by default) on a grid of 2..6 tiles, chosen with v1's
candidate order and tie rule; no tiles when both sides are <= 768 px; the global view letter-boxed to
``base_size`` (1024) with grey 127. Every view yields one token per learned query of the encoder, with no
per-row newline: a view of side ``s`` gives ``(s / 64)^2`` tokens, and the encoder only has query tables
for 768- and 1024-px views. Image tokens: ``global + 1 separator + tiles * per_tile``, i.e.
``257 + 144 * nw * nh`` in the default mode (257 ... 1121).

Without crop mode the reference encodes one view of ``image_size``: stretched to a square when
``image_size <= 768`` (aspect not kept), letter-boxed otherwise.

The reference skips the vision path when the global view's pixels sum to exactly zero (and drops tiles
whose pixels sum to zero); that never happens for a real page and is not reproduced: every image is
encoded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from PIL import Image

from ..deepseek_ocr.processor import ImageInput, choose_grid, normalize, pad_to_square, to_rgb

#: Both sides <= this -> no local tiles, whatever the mode parameters.
TILE_THRESHOLD = 768
#: Tile grid candidates: 2..6 tiles (HF and vLLM paths agree for v2).
MAX_CROPS = 6


def tile_grid(width: int, height: int, tile: int) -> tuple[int, int]:
    """(nw, nh) in crop mode; (1, 1) means no local tiles."""
    if width <= TILE_THRESHOLD and height <= TILE_THRESHOLD:
        return (1, 1)
    return choose_grid(width, height, tile, MAX_CROPS)


def num_image_tokens(
    grid: tuple[int, int], global_size: int, tile_size: int, view_tokens: Mapping[int, int]
) -> int:
    """Tokens of one image: the global view's queries + 1 separator + the queries of every tile."""
    nw, nh = grid
    n = view_tokens[global_size] + 1
    if nw > 1 or nh > 1:
        n += nw * nh * view_tokens[tile_size]
    return n


def preprocess(
    image: Image.Image, base_size: int, image_size: int, crop_mode: bool, view_tokens: Mapping[int, int]
) -> ImageInput:
    """Global view + tiles (``view_tokens``: supported view side -> tokens per view)."""
    used = (
        (("base_size", base_size), ("image_size", image_size)) if crop_mode else (("image_size", image_size),)
    )
    for name, side in used:
        if side not in view_tokens:
            raise ValueError(f"{name} {side} has no query table (supported: {sorted(view_tokens)})")
    image = to_rgb(image)
    w, h = image.size
    tiles = None
    if crop_mode:
        grid = tile_grid(w, h, image_size)
        global_view = pad_to_square(image, base_size)
        nw, nh = grid
        if nw > 1 or nh > 1:
            resized = image.resize((image_size * nw, image_size * nh), Image.Resampling.BICUBIC)
            crops = []
            for k in range(nw * nh):  # row-major over the grid
                c, r = k % nw, k // nw
                box = (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
                crops.append(normalize(resized.crop(box)))
            tiles = torch.stack(crops)
        global_size = base_size
    else:
        grid = (1, 1)
        if image_size <= TILE_THRESHOLD:
            global_view = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        else:
            global_view = pad_to_square(image, image_size)
        global_size = image_size
    return ImageInput(
        global_view=normalize(global_view).unsqueeze(0),
        tiles=tiles,
        grid=grid,
        num_tokens=num_image_tokens(grid, global_size, image_size, view_tokens),
    )
