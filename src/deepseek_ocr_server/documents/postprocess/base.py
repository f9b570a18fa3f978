"""What a family's post-processor is, the helpers they share, and the streaming cleaner.

A post-processor is a pure function over one page's model text: ``process(text, width, height, figure)``
-> :class:`~..schema.PageContent` (clean markdown, blocks, dropped boxes). ``figure(box)`` is called for
each located figure with its pixel box and returns the link the markdown and the block use (or None to
leave figures out). ``stable_length(text)`` says how much of a growing text is final: cleaning
``text[:stable_length(text)]`` gives a prefix of the cleaned full text, whatever comes after, which is
what lets a stream send clean markdown while the page is still being generated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..schema import PageContent

Box = tuple[int, int, int, int]
FigureLink = Callable[[Box], str | None]


@dataclass(frozen=True)
class PostProcessor:
    name: str
    process: Callable[[str, int, int, FigureLink | None], PageContent]
    stable_length: Callable[[str], int]


def partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class StreamCleaner:
    """Turns one page's growing model text into deltas of its clean markdown.

    ``feed(delta)`` returns the clean text that became final; ``finish()`` returns the rest and the
    page's full :class:`PageContent`. Figure links are computed once per box.
    """

    def __init__(self, pp: PostProcessor, width: int, height: int, figure: FigureLink | None) -> None:
        self.pp = pp
        self.width = width
        self.height = height
        self._figure = figure
        self._links: dict[Box, str | None] = {}
        self._raw = ""
        self._stable = 0
        self.emitted = ""

    def _link(self, box: Box) -> str | None:
        if box not in self._links:
            self._links[box] = self._figure(box) if self._figure is not None else None
        return self._links[box]

    def _process(self, text: str) -> PageContent:
        return self.pp.process(text, self.width, self.height, self._link)

    def _advance(self, markdown: str) -> str:
        if not markdown.startswith(self.emitted):
            return ""  # not final after all: wait (the full text at finish() decides)
        delta = markdown[len(self.emitted) :]
        self.emitted = markdown
        return delta

    @property
    def raw(self) -> str:
        return self._raw

    def feed(self, delta: str) -> str:
        if not delta:
            return ""
        self._raw += delta
        k = self.pp.stable_length(self._raw)
        if k <= self._stable:
            return ""
        self._stable = k
        return self._advance(self._process(self._raw[:k]).markdown)

    def finish(self) -> tuple[str, PageContent]:
        content = self._process(self._raw)
        md = content.markdown
        if not md.startswith(self.emitted):  # cannot happen for a correct stable_length; never lose text
            common = 0
            while common < min(len(md), len(self.emitted)) and md[common] == self.emitted[common]:
                common += 1
            self.emitted = self.emitted[:common]
        return self._advance(md), content
