"""Per-family post-processing of model text: the output formats by name, picked by the family spec.

A family's spec (``models/<family>/spec.py``) names the format its text is in (``postprocess =
"grounding"``, ``"otsl"`` or ``"plain"``); ``for_kind(kind)`` returns that :class:`~.base.PostProcessor`.
Unknown kinds and families whose text needs no cleaning get :data:`PLAIN`, which returns the text
unchanged as one unlocated block. A new format is added with ``register(name, processor)``.
"""

from __future__ import annotations

from ..schema import Block, PageContent
from .base import Box, FigureLink, PostProcessor, StreamCleaner
from .grounding import GROUNDING
from .otsl import OTSL


def _plain(text: str, width: int, height: int, figure: FigureLink | None = None) -> PageContent:
    return PageContent(text, [Block("text", None, None, text.strip())] if text.strip() else [], 0)


PLAIN = PostProcessor("plain", _plain, len, append="verbatim")

#: the output formats by name (what a family spec's ``postprocess`` names)
POSTPROCESSORS: dict[str, PostProcessor] = {"grounding": GROUNDING, "otsl": OTSL, "plain": PLAIN}


def register(name: str, pp: PostProcessor) -> None:
    """Add an output format a family spec can name."""
    POSTPROCESSORS[name] = pp


def for_kind(kind: str) -> PostProcessor:
    from ...models.registry import families

    spec = families().get(kind)
    return POSTPROCESSORS[spec.postprocess] if spec is not None else PLAIN


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
