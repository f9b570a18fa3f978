"""One batch run: documents -> pages -> engine -> post-processing -> outputs, with resume and failures.

- Inputs already done (:func:`.outputs.up_to_date`) are skipped unless ``overwrite``; missing inputs
  and documents that cannot be opened fail at once, with their reason, and the run goes on.
- Every page of every remaining document goes through the one engine, at most ``jobs`` pages in
  flight, documents in command-line order, pages in page order; pages of consecutive documents are in
  flight together, so a folder of single-page images batches as well as a long PDF.
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

from . import pipeline
from .engines import Engine, FatalError, PageError
from .inputs import Doc
from .outputs import images_dir, up_to_date, write_document
from .progress import Progress


@dataclass
class RunOptions:
    model_id: str
    kind: str
    fmt: str = "md"
    boxes: bool = False
    overwrite: bool = False
    jobs: int = 4
    dpi: int = pipeline.DEFAULT_DPI


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
    data: bytes
    count: int
    pages: list[pipeline.PageOut | None]
    left: int
    failed: str | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


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
        # pdfium is not thread-safe: one thread renders and post-processes, the engine has its own
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

    def _count(self, doc: Doc) -> tuple[bytes, int]:
        data = self._read(doc)
        src = pipeline.open_document(data, doc.name, self.opts.dpi)
        try:
            return data, src.count
        finally:
            src.close()

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
                data, count = await self._in_pool(self._count, doc)
            except pipeline.DocumentError as exc:
                self._fail(doc.name, str(exc))
                continue
            except OSError as exc:
                self._fail(doc.name, f"cannot read it: {exc.strerror or exc}")
                continue
            # keep the bytes only for stdin (files are read again when their turn comes)
            todo.append(_DocState(doc, data if doc.source is None else b"", count, [None] * count, count))
            self.progress.add(count)
        if self.summary.skipped:
            n = len(self.summary.skipped)
            self.progress.info(
                f"skipping {n} document{'s' if n != 1 else ''} already done (--overwrite redoes them)"
            )
        if not todo:
            return
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
            for st in todo:
                for t in st.tasks:
                    t.cancel()
            await asyncio.gather(*(t for st in todo for t in st.tasks), return_exceptions=True)
            await self.engine.close(interrupted=interrupted)

    async def _pages(self, todo: list[_DocState]) -> None:
        slots = asyncio.Semaphore(max(1, self.opts.jobs))
        for st in todo:
            try:
                data = st.data or await self._in_pool(self._read, st.doc)
                source = await self._in_pool(pipeline.open_document, data, st.doc.name, self.opts.dpi)
            except (pipeline.DocumentError, OSError) as exc:
                self._fail(st.doc.name, str(exc))
                continue
            st.data = b""
            try:
                for i in range(st.count):
                    await slots.acquire()
                    if st.failed:
                        slots.release()
                        break
                    try:
                        image = await self._in_pool(source.render, i)
                    except Exception as exc:  # noqa: BLE001 - pdfium/PIL errors of one page
                        slots.release()
                        self._page_failed(st, f"page {i + 1}: cannot render it ({exc})")
                        break
                    st.tasks.append(asyncio.create_task(self._page(st, i, image, slots)))
            finally:
                await self._in_pool(source.close)
        await asyncio.gather(*(t for st in todo for t in st.tasks), return_exceptions=True)

    def _page_failed(self, st: _DocState, reason: str) -> None:
        if st.failed:
            return
        st.failed = reason
        for t in st.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self._fail(st.doc.name, reason)

    async def _page(self, st: _DocState, i: int, image: Any, slots: asyncio.Semaphore) -> None:
        try:
            ans = await self.engine.ocr(image)
            out = await self._in_pool(
                pipeline.page_result, self.opts.kind, ans.text, image, i, ans.finish_reason, self.opts.boxes
            )
        except PageError as exc:
            self._page_failed(st, f"page {i + 1}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a bug must fail this document, not hang the run
            self._page_failed(st, f"page {i + 1}: internal error: {type(exc).__name__}: {exc}")
            return
        finally:
            slots.release()
        st.pages[i] = out
        st.left -= 1
        self.summary.pages += 1
        self.progress.page_done()
        if st.left == 0 and not st.failed:
            self._finish(st)

    def _finish(self, st: _DocState) -> None:
        doc, opts = st.doc, self.opts
        pages = [p for p in st.pages if p is not None]
        image_dir = images_dir(doc.out_base).name if doc.out_base is not None else ""
        try:
            out = pipeline.assemble(
                doc.name, doc.source, opts.model_id, pages, opts.fmt, opts.boxes, image_dir
            )
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
        self.progress.doc_done(doc.name, st.count, dest)
