"""Pixel normalisation shared by every input path (API images, document pages, the batch CLI): EXIF
rotation, any PIL mode to 8-bit RGB, transparency composited on white. It sits outside ``api/`` so that
``documents/`` and the CLI use it without importing the HTTP layer."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

__all__ = ["normalise"]


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes (I;16*, I, F) -> L, scaled rather than clipped."""
    arr = np.asarray(img)
    a = arr.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    integer = img.mode == "I" or img.mode.startswith("I;16")
    if integer and lo >= 0 and hi <= 255:  # 8-bit data stored in a wide mode: keep it as is
        arr8 = a.astype(np.uint8)
    elif img.mode.startswith("I;16"):
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    elif img.mode == "I" and lo >= 0 and hi <= 65535:
        arr8 = (a / 257.0).round().astype(np.uint8)
    else:
        arr8 = np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def normalise(img: Image.Image) -> Image.Image:
    """EXIF rotation applied; any mode -> RGB (transparency composited on white)."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if "transparency" in img.info and mode in ("L", "RGB", "1", "P"):
        img = img.convert("RGBA")  # a tRNS colour key: composite it on white like an alpha channel
        mode = "RGBA"
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _to_8bit(img).convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        # composite on white with the alpha channel as the paste mask: one RGB canvas + one alpha plane
        # (not three full RGBA copies), which matters for pages of tens of megapixels
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
