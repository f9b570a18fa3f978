"""DeepSeek-OCR grounding output -> clean markdown + located blocks (pure functions over model text).

The grounding format: ``<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`` introduces each
block ("convert to markdown" mode: a layout class such as ``title``, ``text``, ``table``, ``image``,
followed by the block's content) or each located phrase (``Locate <|ref|>phrase<|/ref|>`` answers).
Coordinates are integers on a 0..999 grid over the page: pixel ``x = int(x / 999 * width)``.

Clean markdown: every tag is removed; a tag labelled ``image`` becomes ``![](link)`` (one per box; the
link is what the ``figure`` callback returns for the crop); ``\\coloneqq`` -> ``:=``, ``\\eqqcolon`` -> ``=:``;
three or more newlines collapse to one blank line; the page is stripped.

Malformed output never raises: a missing ``<|/ref|>`` before ``<|det|>`` is tolerated, a ``<|det|>``
without ``<|/det|>`` ends where its box list ends, a tag without a usable box (truncated, no numbers,
zero area), a stray marker or a runaway label is removed from the markdown and counted in
``dropped_boxes``; the text around it is kept. Coordinates outside 0..999 are clamped.

DeepSeek-OCR 2 writes the same format: it shares this post-processor through the registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..schema import Block, PageContent
from .base import Box, FigureLink, PostProcessor, partial_suffix

REF, REF_END, DET, DET_END = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"
MARKERS = (REF, REF_END, DET, DET_END)
GRID = 999
#: a label longer than this (or one with a newline) is not a label: the model lost the format
MAX_LABEL = 200
#: a box list longer than this is runaway output
MAX_DET = 4000

_SPLIT = re.compile(r"(<\|/?(?:ref|det)\|>)")
_NON_BOX = re.compile(r"[^\[\]\d\s,.+\-]")
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_LATEX_TAIL = re.compile(r"\\[A-Za-z]*$")
_BLANKS = re.compile(r"\n{3,}")


@dataclass
class _Tag:
    label: str
    boxes: list[Box]  # on the 0..999 grid


def parse_boxes(payload: str) -> tuple[list[Box], int]:
    """Boxes of a det payload (grid coordinates, clamped, ordered) and the number of unusable ones."""
    boxes: list[Box] = []
    bad = 0
    for m in _BOX.finditer(payload):
        x1, y1, x2, y2 = (min(GRID, max(0, round(float(v)))) for v in m.groups())
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        if x2 <= x1 or y2 <= y1:
            bad += 1
            continue
        boxes.append((x1, y1, x2, y2))
    if re.search(r"\d", _BOX.sub("", payload)):  # numbers left over: a truncated or mis-shaped box
        bad += 1
    return boxes, bad


def _scan(text: str) -> tuple[list[str | _Tag], int | None, int]:
    """Items (plain text or tags) in order, the index where an unresolved tag starts at the end of
    ``text`` (None if none), and the count of dropped tags/boxes."""
    items: list[str | _Tag] = []
    dropped = 0
    state = "text"
    label = det = ""
    tag_start = 0
    pos = 0

    def close_det(payload: str) -> None:
        """Finish a det whose box payload is ``payload``."""
        nonlocal dropped
        boxes, bad = parse_boxes(payload)
        dropped += bad
        if boxes:
            items.append(_Tag(label.strip(), boxes))
        elif not bad:
            dropped += 1  # a tag without any box

    parts = _SPLIT.split(text)
    i = 0
    while i < len(parts):
        part = parts[i]
        marker = i % 2 == 1
        start = pos
        if state == "text":
            if part == REF:
                state, label, tag_start = "label", "", start
            elif marker:
                dropped += 1  # a stray marker
            elif part:
                items.append(part)
        elif state == "label":
            if part == REF_END:
                state = "after_ref"
            elif part == DET:  # <|/ref|> missing: the label ends here
                state, det = "det", ""
            elif marker:  # a tag broken by another tag: drop it, read the marker afresh
                dropped += 1
                state = "text"
                continue
            else:
                label += part
                if "\n" in label or len(label) > MAX_LABEL:  # not a label: the text stays
                    dropped += 1
                    items.append(label)
                    state = "text"
        elif state == "after_ref":
            if part == DET:
                state, det = "det", ""
            elif marker or part.strip():  # a tag without a box
                dropped += 1
                state = "text"
                continue
        elif state == "det":
            if part == DET_END:
                close_det(det)
                state = "text"
            elif marker:  # <|/det|> missing before the next tag
                close_det(det)
                state = "text"
                continue
            else:
                det += part
                bad = _NON_BOX.search(det)
                if bad or len(det) > MAX_DET:  # <|/det|> missing: the box list ended before this text
                    cut = bad.start() if bad else len(det)
                    end = det.rfind("]", 0, cut) + 1  # the box list ends at its last bracket
                    close_det(det[:end])
                    if tail := det[end:]:
                        items.append(tail)
                    state = "text"
        pos += len(part)
        i += 1

    pending = None if state == "text" else tag_start
    if state == "label":
        dropped += 1
    elif state == "after_ref":
        dropped += 1
    elif state == "det":
        close_det(det)
    return items, pending, dropped


def _fix(text: str) -> str:
    """The official scripts' text fixes."""
    text = text.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
    return _BLANKS.sub("\n\n", text)


def to_pixels(box: Box, width: int, height: int) -> Box:
    x1, y1, x2, y2 = box
    return (
        min(width, int(x1 / GRID * width)),
        min(height, int(y1 / GRID * height)),
        min(width, int(x2 / GRID * width)),
        min(height, int(y2 / GRID * height)),
    )


def _norm(box: Box, width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (round(x1 / width, 4), round(y1 / height, 4), round(x2 / width, 4), round(y2 / height, 4))


def process(text: str, width: int, height: int, figure: FigureLink | None = None) -> PageContent:
    items, _, dropped = _scan(text)
    md: list[str] = []
    blocks: list[Block] = []
    owner: Block | None = None  # the block the following text belongs to
    owned: list[str] = []

    def settle() -> None:
        if owner is not None:
            owner.text = _fix("".join(owned)).strip()
        owned.clear()

    for item in items:
        if isinstance(item, str):
            md.append(item)
            owned.append(item)
            continue
        settle()
        first: Block | None = None
        for grid_box in item.boxes:
            px = to_pixels(grid_box, width, height)
            block = Block(item.label or "text", px, _norm(px, width, height), "")
            if item.label.strip().lower() == "image":
                link = figure(px) if figure is not None else None
                block.figure = link
                if link:
                    md.append(f"![]({link})\n")
            blocks.append(block)
            first = first or block
        owner = first
    # text written before the first tag (or a page without any tag) is one block that is not located
    lead: list[str] = []
    for item in items:
        if not isinstance(item, str):
            break
        lead.append(item)
    lead_text = _fix("".join(lead)).strip()
    settle()
    if lead_text:
        blocks.insert(0, Block("text", None, None, lead_text))
    return PageContent(_fix("".join(md)).strip(), blocks, dropped)


def stable_length(text: str) -> int:
    _, pending, _ = _scan(text)
    k = len(text) if pending is None else pending
    k = min(k, len(text) - partial_suffix(text, MARKERS))
    if m := _LATEX_TAIL.search(text[:k]):
        k = m.start()
    return k


GROUNDING = PostProcessor("deepseek-grounding", process, stable_length)
