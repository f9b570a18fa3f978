"""Progress on stderr: a tqdm bar (pages done / total, pages per minute, ETA) when stderr is a terminal,
one plain line per finished document otherwise, nothing but errors and the summary with ``-q``.

Failures are always printed (one line each, as they happen); the summary comes at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        use_bar = (not quiet) and (self.stream.isatty() if bar is None else bar)
        self.total = 0
        self.done = 0
        self.docs_total = 0
        self.docs_done = 0
        self.t0: float | None = None
        self._bar: tqdm | None = None
        if use_bar:
            self._bar = tqdm(
                total=0,
                unit="page",
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} pages [{elapsed}<{remaining}{postfix}]",
            )

    # --- counting ----------------------------------------------------------------------------------
    def start(self) -> None:
        """The clock for pages/min and the ETA starts here (after the model is ready)."""
        self.t0 = time.monotonic()
        if self._bar is not None:
            self._bar.reset(total=self.total)

    def add(self, pages: int, docs: int = 1) -> None:
        self.total += pages
        self.docs_total += docs
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def rate(self) -> float | None:
        """Pages per minute so far."""
        if self.t0 is None or self.done == 0:
            return None
        return self.done / max(time.monotonic() - self.t0, 1e-6) * 60

    def eta(self) -> float | None:
        r = self.rate()
        return None if r is None else (self.total - self.done) / r * 60

    def page_done(self) -> None:
        self.done += 1
        if self._bar is not None:
            r = self.rate()
            self._bar.set_postfix_str(f"{r:.1f} pages/min" if r is not None else "", refresh=False)
            self._bar.update(1)

    # --- messages ----------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def doc_done(self, name: str, pages: int, dest: str) -> None:
        self.docs_done += 1
        if self.quiet or self._bar is not None:
            return
        r, eta = self.rate(), self.eta()
        speed = f", {r:.1f} pages/min" if r is not None else ""
        left = f", ETA {_duration(eta)}" if eta is not None and self.done < self.total else ""
        self._print(
            f"[{self.done}/{self.total} pages{speed}{left}] {name}: {pages} page"
            f"{'s' if pages != 1 else ''} -> {dest}"
        )

    def info(self, line: str) -> None:
        if not self.quiet:
            self._print(line)

    def error(self, line: str) -> None:
        self._print(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
