"""The document result: one schema, declared once, used by the API's ``document`` field and the CLI.

JSON shape (``DocumentResult.to_dict()``)::

    {"object": "ocr.document",
     "model": "deepseek-ocr",
     "pages": [
       {"page": 1,                       # 1-based page number in the source document
        "width": 1191, "height": 1684,   # the page image the model saw, in pixels
        "markdown": "...",               # the page's clean markdown
        "finish_reason": "stop",         # "length" when this page hit max_tokens
        "usage": {"prompt_tokens": 281, "completion_tokens": 812},
        "dropped_boxes": 0,              # grounding tags that could not be parsed (text kept, box dropped)
        "blocks": [                      # reading order (the order the model wrote them)
          {"type": "title",              # the model's label (DeepSeek-OCR: title, text, table, image, ...)
           "bbox": [96, 120, 1090, 180], # [x1, y1, x2, y2] in page pixels, or null when not located
           "bbox_norm": [0.0806, 0.0713, 0.9152, 0.1069],   # the same box divided by width/height
           "text": "1. Introduction",    # the block's text (markdown), "" for figures
           "figure": null}               # figures: the crop's link (a data: URL unless a front end
        ],                               #          stores crops elsewhere)
        "layout_image": null}            # with layout images on: PNG data URL of the page, boxes drawn
     ]}

Boxes: DeepSeek-OCR writes them on a 0..999 grid relative to the page, so pixel ``x = x_grid / 999 * width``
(and likewise for y), clamped into the page. Families that do not locate blocks (PaddleOCR-VL recognises a
whole image) give one block per page with ``bbox`` and ``bbox_norm`` null.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


def page_marker(number: int) -> str:
    """What separates the pages of a document in its joined text: an HTML comment (invisible when the
    markdown is rendered) before each page, pages separated by a blank line."""
    return f"<!-- page {number} -->"


def page_prefix(number: int, first: bool) -> str:
    return ("" if first else "\n\n") + page_marker(number) + "\n\n"


@dataclass
class Block:
    type: str
    bbox: tuple[int, int, int, int] | None
    bbox_norm: tuple[float, float, float, float] | None
    text: str
    figure: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "bbox": list(self.bbox) if self.bbox is not None else None,
            "bbox_norm": list(self.bbox_norm) if self.bbox_norm is not None else None,
            "text": self.text,
            "figure": self.figure,
        }


@dataclass
class PageContent:
    """What a post-processor makes of one page's model text (pure: no engine facts)."""

    markdown: str
    blocks: list[Block] = field(default_factory=list)
    dropped_boxes: int = 0


@dataclass
class PageResult:
    page: int
    width: int
    height: int
    raw: str  # the model's text, exactly
    content: PageContent
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    layout_image: str | None = None

    @property
    def markdown(self) -> str:
        return self.content.markdown

    @property
    def blocks(self) -> list[Block]:
        return self.content.blocks

    def to_dict(self) -> dict[str, Any]:
        return {
            "page": self.page,
            "width": self.width,
            "height": self.height,
            "markdown": self.content.markdown,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
            "dropped_boxes": self.content.dropped_boxes,
            "blocks": [b.to_dict() for b in self.content.blocks],
            "layout_image": self.layout_image,
        }


@dataclass
class DocumentResult:
    model: str
    pages: list[PageResult] = field(default_factory=list)

    @property
    def finish_reason(self) -> FinishReason:
        """``length`` if any page hit its token budget."""
        return "length" if any(p.finish_reason == "length" for p in self.pages) else "stop"

    @property
    def prompt_tokens(self) -> int:
        return sum(p.prompt_tokens for p in self.pages)

    @property
    def completion_tokens(self) -> int:
        return sum(p.completion_tokens for p in self.pages)

    def joined(self, raw: bool = False) -> str:
        """The document's text: each page's markdown (or raw text) after its :func:`page_marker`."""
        return "".join(
            page_prefix(p.page, i == 0) + (p.raw if raw else p.markdown) for i, p in enumerate(self.pages)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"object": "ocr.document", "model": self.model, "pages": [p.to_dict() for p in self.pages]}
