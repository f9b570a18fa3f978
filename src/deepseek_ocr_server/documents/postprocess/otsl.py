"""PaddleOCR-VL output -> clean markdown (pure functions over model text).

- Tables come as OTSL cell tags: ``<fcel>`` a cell with text (the text follows the tag), ``<ecel>`` an
  empty cell, ``<lcel>`` merged with the cell to its left, ``<ucel>`` merged with the cell above,
  ``<xcel>`` merged both ways (inside a 2-D span), ``<nl>`` the end of a row; ``<ched>``/``<rhed>``/
  ``<srow>`` (header and section cells of the OTSL vocabulary) are read as cells with text. A run of these
  tags becomes one HTML ``<table>`` with ``colspan``/``rowspan``; header cells become ``<th>``. Merge tags
  with nothing to merge into (an ``<lcel>`` in the first column, a ``<ucel>`` in the first row) are read
  as empty cells, short rows are padded: malformed tables never raise.
- Formulas: ``\\( ... \\)`` -> ``$...$`` and ``\\[ ... \\]`` -> ``$$...$$`` (an escaped ``\\\\[`` is left alone).

PaddleOCR-VL recognises a whole image and does not locate blocks: a page is one block (``table`` when it
holds a table, else ``text``) without a box.
"""

from __future__ import annotations

import html
import re

from ..schema import Block, PageContent
from .base import FigureLink, PostProcessor, partial_suffix

CELL_TAGS = ("fcel", "ecel", "lcel", "ucel", "xcel", "ched", "rhed", "srow")
TAGS = (*CELL_TAGS, "nl")
MARKERS = tuple(f"<{t}>" for t in TAGS)
_TEXT_CELLS = {"fcel", "ched", "rhed", "srow"}
_TAG = re.compile(r"<(" + "|".join(TAGS) + r")>")
_INLINE = re.compile(r"(?<!\\)\\\((.*?)(?<!\\)\\\)", re.S)
_DISPLAY = re.compile(r"(?<!\\)\\\[(.*?)(?<!\\)\\\]", re.S)
_OPEN = re.compile(r"(?<!\\)\\([(\[])")
_CLOSE = {"(": re.compile(r"(?<!\\)\\\)"), "[": re.compile(r"(?<!\\)\\\]")}


def otsl_to_html(otsl: str) -> str:
    """One OTSL table (tags and cell texts) -> an HTML table."""
    rows: list[list[tuple[str, str]]] = [[]]
    pieces = _TAG.split(otsl)
    # pieces: [lead, tag, text, tag, text, ...]; text before the first tag is not part of a cell
    for j in range(1, len(pieces), 2):
        tag, text = pieces[j], pieces[j + 1]
        if tag == "nl":
            rows.append([])
            if text.strip():
                rows[-1].append(("fcel", text))
            continue
        rows[-1].append((tag, text))
    rows = [r for r in rows if r]
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    grid = [r + [("ecel", "")] * (width - len(r)) for r in rows]
    for r, row in enumerate(grid):  # merge tags with nothing to merge into read as empty cells
        for c, (tag, _) in enumerate(row):
            if (
                (tag == "lcel" and c == 0)
                or (tag == "ucel" and r == 0)
                or (tag == "xcel" and (r == 0 or c == 0))
            ):
                row[c] = ("ecel", "")
    covered = [[False] * width for _ in grid]
    out = ["<table>"]
    for r, row in enumerate(grid):
        out.append("<tr>")
        for c, (tag, text) in enumerate(row):
            if covered[r][c]:
                continue
            if tag in ("lcel", "ucel", "xcel"):  # a merge tag no span reached: an empty cell
                out.append("<td></td>")
                continue
            span_c = 1
            while c + span_c < width and grid[r][c + span_c][0] == "lcel":
                span_c += 1
            span_r = 1
            while r + span_r < len(grid) and grid[r + span_r][c][0] == "ucel":
                span_r += 1
            for rr in range(r, r + span_r):
                for cc in range(c, c + span_c):
                    if (rr, cc) != (r, c) and grid[rr][cc][0] in ("lcel", "ucel", "xcel"):
                        covered[rr][cc] = True
            cell = "th" if tag in ("ched", "rhed") else "td"
            attrs = (f' colspan="{span_c}"' if span_c > 1 else "") + (
                f' rowspan="{span_r}"' if span_r > 1 else ""
            )
            body = html.escape(formulas(text).strip(), quote=False) if tag in _TEXT_CELLS else ""
            out.append(f"<{cell}{attrs}>{body}</{cell}>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def formulas(text: str) -> str:
    text = _DISPLAY.sub(lambda m: "$$" + m.group(1).strip() + "$$", text)
    return _INLINE.sub(lambda m: "$" + m.group(1).strip() + "$", text)


def _split_table(text: str) -> tuple[str, str, str] | None:
    """(before, table, after) around the run of OTSL tags, or None without a table."""
    first = _TAG.search(text)
    if first is None:
        return None
    last = list(_TAG.finditer(text))[-1]
    end = last.end()
    if last.group(1) != "nl":  # the last cell's text runs to the end of its line
        nl = text.find("\n", end)
        end = len(text) if nl < 0 else nl
    return text[: first.start()], text[first.start() : end], text[end:]


def process(text: str, width: int, height: int, figure: FigureLink | None = None) -> PageContent:
    split = _split_table(text)
    if split is None:
        md = formulas(text).strip()
        kind = "text"
    else:
        before, table, after = split
        md = "\n\n".join(
            p for p in (formulas(before).strip(), otsl_to_html(table), formulas(after).strip()) if p
        )
        kind = "table"
    blocks = [Block(kind, None, None, md)] if md else []
    return PageContent(md, blocks, 0)


def stable_length(text: str) -> int:
    """A table is final only when the page is; an open formula only when it closes."""
    k = len(text) - partial_suffix(text, (*MARKERS, "\\(", "\\["))
    if (m := _TAG.search(text)) is not None:
        k = min(k, m.start())
    pos = 0
    while (m := _OPEN.search(text, pos)) is not None and m.start() < k:
        close = _CLOSE[m.group(1)].search(text, m.end())
        if close is None:
            k = m.start()
            break
        pos = close.end()
    if text[:k].endswith("\\") and not text[:k].endswith("\\\\"):
        k -= 1
    return k


OTSL = PostProcessor("paddleocr-otsl", process, stable_length)
