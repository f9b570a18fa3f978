"""Images made from a page and its blocks: figure crops and the boxes-drawn layout picture."""

from __future__ import annotations

import base64
import io
import zlib
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from .postprocess.base import Box
from .schema import Block


def data_url(image: Image.Image, fmt: str = "PNG", **save: object) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def crop(image: Image.Image, box: Box) -> Image.Image:
    x1, y1, x2, y2 = box
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


def figure_data_url(image: Image.Image, box: Box) -> str:
    """A figure crop as a JPEG data URL (the default link of figures in the markdown)."""
    return data_url(crop(image, box).convert("RGB"), "JPEG", quality=90)


def _colour(label: str) -> tuple[int, int, int]:
    h = zlib.crc32(label.encode())
    return (60 + h % 160, 60 + (h >> 8) % 160, 60 + (h >> 16) % 160)


def draw_layout(image: Image.Image, blocks: Sequence[Block]) -> Image.Image:
    """A copy of the page with every located block's box drawn and labelled (reading-order index and
    label), figures shaded, titles drawn thicker."""
    out = image.convert("RGB").copy()
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(overlay)
    draw = ImageDraw.Draw(out)
    size = max(12, min(out.size) // 60)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    located = [b for b in blocks if b.bbox is not None]
    for i, block in enumerate(located, start=1):
        assert block.bbox is not None
        x1, y1, x2, y2 = block.bbox
        colour = _colour(block.type)
        width = max(2, size // 4) * (2 if block.type == "title" else 1)
        if block.type == "image":
            shade.rectangle((x1, y1, x2, y2), fill=(*colour, 48))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        tag = f"{i} {block.type}"
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), tag, font=font)
        ty = max(0, y1 - (ty2 - ty1) - 4)
        draw.rectangle((x1, ty, x1 + (tx2 - tx1) + 6, ty + (ty2 - ty1) + 4), fill=colour)
        draw.text((x1 + 3, ty + 2 - ty1), tag, fill=(255, 255, 255), font=font)
    return Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB")


def layout_png(image: Image.Image, blocks: Sequence[Block]) -> bytes:
    buf = io.BytesIO()
    draw_layout(image, blocks).save(buf, "PNG")
    return buf.getvalue()
