"""One batch run: documents -> pages -> engine -> post-processing -> outputs, with resume and failures.

- Inputs already done (:func:`.outputs.up_to_date`) are skipped unless ``overwrite``; missing inputs
  and documents that cannot be opened fail at once, with their reason, and the run goes on. Pages are
  counted up front (no rendering) for the progress total.
- Every selected page of every remaining document goes through the one engine, at most ``jobs`` pages
  in flight, documents in command-line order, pages in page order. Pages are rendered a few at a time
  (``jobs // 4``, at least 1) when there is room, so memory stays bounded on long PDFs, and pages of
  consecutive documents are in flight together: a folder of single-page images batches as well as a
  long PDF.
- A document is written (atomically, main file last) once all its pages are read; a page that fails
  fails its document (nothing of it is written) and the others continue.
- Cancelling the run (Ctrl-C) stops the pages in flight; documents already written stay complete,
  the others are not written at all.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..documents import DocumentResult, Page, PageResult
from . import pipeline
from .engines import Engine, FatalError, PageError
from .inputs import Doc
from .outputs import images_dir, up_to_date, write_document
from .progress import Progress


@dataclass
class RunOptions:
    model_id: str
    fmt: str = "md"
    boxes: bool = False
    overwrite: bool = False
    jobs: int = 4
    dpi: int = pipeline.DEFAULT_DPI
    pages: str | None = None  # page selection applied to every document ("1-3,7")
    max_pixels: int = 64_000_000


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    pages: int = 0
    interrupted: bool = False
    fatal: str | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if (self.failed or self.fatal) else 0


@dataclass(eq=False)
class _DocState:
    doc: Doc
    data: bytes  # kept for stdin only; files are read again when their turn comes
    numbers: list[int]  # the selected page numbers
    figures: pipeline.FigureStore
    results: dict[int, PageResult] = field(default_factory=dict)
    boxes: dict[int, bytes] = field(default_factory=dict)
    failed: str | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class _Budget:
    """Pages in flight (one producer acquires, page completions release)."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._changed = asyncio.Event()

    async def acquire(self, k: int) -> None:
        while self.free < k:
            self._changed.clear()
            await self._changed.wait()
        self.free -= k

    def release(self, k: int) -> None:
        if k:
            self.free += k
            self._changed.set()


class BatchRun:
    def __init__(
        self,
        docs: list[Doc],
        engine: Engine,
        opts: RunOptions,
        progress: Progress,
        stdout: TextIO | None = None,
    ) -> None:
        self.docs = docs
        self.engine = engine
        self.opts = opts
        self.progress = progress
        self.stdout = stdout or sys.stdout
        self.summary = Summary()
        # pdfium is not thread-safe: one thread counts, renders and draws; the engine has its own
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ocr-render")

    # --- helpers -----------------------------------------------------------------------------------
    def _fail(self, name: str, reason: str) -> None:
        self.summary.failed.append((name, reason))
        self.progress.error(f"deepseek-ocr: {name}: {reason}")

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _read(self, doc: Doc) -> bytes:
        if doc.source is None:
            return doc.data if doc.data is not None else sys.stdin.buffer.read()
        return doc.source.read_bytes()

    def _open(self, doc: Doc) -> tuple[bytes, list[int]]:
        data = self._read(doc)
        return data, pipeline.selected_pages(self.opts.pages, pipeline.count_pages(data))

    # --- the run -----------------------------------------------------------------------------------
    async def run(self) -> Summary:
        try:
            await self._run()
        except asyncio.CancelledError:
            self.summary.interrupted = True
            raise
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
        return self.summary

    async def _run(self) -> None:
        opts = self.opts
        todo: list[_DocState] = []
        for doc in self.docs:
            if doc.error:
                self._fail(doc.name, doc.error)
                continue
            if not opts.overwrite and up_to_date(doc, opts.fmt, opts.boxes):
                self.summary.skipped.append(doc.name)
                continue
            try:
                data, numbers = await self._in_pool(self._open, doc)
            except pipeline.DocumentError as exc:
                self._fail(doc.name, str(exc))
                continue
            except OSError as exc:
                self._fail(doc.name, f"cannot read it: {exc.strerror or exc}")
                continue
            folder = images_dir(doc.out_base).name if doc.out_base is not None else None
            todo.append(
                _DocState(doc, data if doc.source is None else b"", numbers, pipeline.FigureStore(folder))
            )
            self.progress.add(len(numbers))
        if self.summary.skipped:
            n = len(self.summary.skipped)
            self.progress.info(
                f"skipping {n} document{'s' if n != 1 else ''} already done (--overwrite redoes them)"
            )
        if not todo:
            return
        self.progress.info(f"{sum(len(st.numbers) for st in todo)} pages of {len(todo)} documents; "
                           f"{self.engine.describe()}")  # fmt: skip
        try:
            await self.engine.start()
        except FatalError as exc:
            self.summary.fatal = str(exc)
            self.progress.error(f"deepseek-ocr: error: {exc}")
            return
        self.progress.start()
        interrupted = False
        try:
            await self._pages(todo)
        except asyncio.CancelledError:
            interrupted = True
            raise
        finally:
            tasks = [t for st in todo for t in st.tasks]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.engine.close(interrupted=interrupted)

    async def _pages(self, todo: list[_DocState]) -> None:
        budget = _Budget(max(1, self.opts.jobs))
        per_load = max(1, self.opts.jobs // 4)
        for st in todo:
            try:
                data = st.data or await self._in_pool(self._read, st.doc)
            except OSError as exc:
                self._fail(st.doc.name, f"cannot read it: {exc.strerror or exc}")
                continue
            st.data = b""
            for k in range(0, len(st.numbers), per_load):
                part = st.numbers[k : k + per_load]
                await budget.acquire(len(part))
                if st.failed:
                    budget.release(len(part))
                    break
                try:
                    pages = await self._in_pool(
                        pipeline.load_chunk, data, part, self.opts.dpi, self.opts.max_pixels
                    )
                except pipeline.DocumentError as exc:
                    budget.release(len(part))
                    self._page_failed(st, str(exc))
                    break
                st.tasks.append(asyncio.create_task(self._chunk(st, pages, budget)))
        await asyncio.gather(*(t for st in todo for t in st.tasks), return_exceptions=True)

    def _page_failed(self, st: _DocState, reason: str) -> None:
        if st.failed:
            return
        st.failed = reason
        for t in st.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self._fail(st.doc.name, reason)

    async def _chunk(self, st: _DocState, pages: list[Page], budget: _Budget) -> None:
        by_number = {p.number: p for p in pages}
        held = len(pages)
        try:
            async for result in self.engine.run_pages(pages, st.figures):
                if self.opts.boxes and self.opts.fmt == "md":
                    st.boxes[result.page] = await self._in_pool(
                        pipeline.boxes_png, by_number[result.page], result
                    )
                st.results[result.page] = result
                held -= 1
                budget.release(1)
                self.summary.pages += 1
                self.progress.page_done()
        except PageError as exc:
            self._page_failed(st, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug must fail this document, not hang the run
            self._page_failed(st, f"internal error: {type(exc).__name__}: {exc}")
            return
        finally:
            budget.release(held)
        if len(st.results) == len(st.numbers) and not st.failed:
            self._finish(st)

    def _finish(self, st: _DocState) -> None:
        doc, opts = st.doc, self.opts
        result = DocumentResult(opts.model_id, [st.results[n] for n in st.numbers])
        try:
            out = pipeline.document_output(result, opts.fmt, st.figures.files, st.boxes)
            if doc.to_stdout:
                self.stdout.write(out.main_text)
                if not out.main_text.endswith("\n"):
                    self.stdout.write("\n")
                self.stdout.flush()
                dest = "stdout"
            else:
                dest = str(write_document(doc, out, opts.fmt, opts.boxes))
        except OSError as exc:
            self._fail(doc.name, f"cannot write its outputs: {exc}")
            return
        self.summary.done.append(doc.name)
        self.progress.doc_done(doc.name, len(st.numbers), dest)
