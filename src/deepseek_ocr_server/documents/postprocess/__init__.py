"""Per-family post-processing of model text, keyed by model kind in one registry.

``for_kind(kind)`` returns the :class:`~.base.PostProcessor` of a model kind; kinds without an entry
(the test ``fake`` kind, a family whose text needs no cleaning) get :data:`PLAIN`, which returns the
text unchanged as one unlocated block. A new family that writes an existing format registers the same
object (``register("deepseek-ocr-2", GROUNDING)``).
"""

from __future__ import annotations

from ..schema import Block, PageContent
from .base import Box, FigureLink, PostProcessor, StreamCleaner
from .grounding import GROUNDING
from .otsl import OTSL


def _plain(text: str, width: int, height: int, figure: FigureLink | None = None) -> PageContent:
    return PageContent(text, [Block("text", None, None, text.strip())] if text.strip() else [], 0)


PLAIN = PostProcessor("plain", _plain, len)

POSTPROCESSORS: dict[str, PostProcessor] = {
    "deepseek-ocr": GROUNDING,
    "paddleocr-vl": OTSL,
}


def register(kind: str, pp: PostProcessor) -> None:
    POSTPROCESSORS[kind] = pp


def for_kind(kind: str) -> PostProcessor:
    return POSTPROCESSORS.get(kind, PLAIN)


__all__ = [
    "GROUNDING",
    "OTSL",
    "PLAIN",
    "POSTPROCESSORS",
    "Box",
    "FigureLink",
    "PostProcessor",
    "StreamCleaner",
    "for_kind",
    "register",
]
