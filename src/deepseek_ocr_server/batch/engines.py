"""The two ways pages get read: in this process (the server's engine) or by a running server (HTTP).

Both take a few pages of a document and yield each page's :class:`~..documents.PageResult` (raw text,
clean markdown, blocks, figures through the document's figure sink), so everything after them
(outputs, resume) is the same.

- :class:`InProcessEngine` loads the model once, as the server does (settings -> assets, downloaded
  if needed -> ``load_model``), and runs the pages through ``documents.run_jobs`` into the same
  continuous-batching scheduler the server uses: all pages in flight (``--jobs``, default
  ``max_running + 2``), of whatever documents, decode together.
- :class:`HttpEngine` sends each page as a Chat Completions request with the page as a PNG ``data:``
  URL to ``--server URL`` (``deepseek-ocr-server`` or any OpenAI-compatible server serving the model),
  ``--jobs`` requests at a time, and post-processes the answer here with the family's post-processor
  (so any server that returns the model's text works). Only the decoding/vision flags the user typed
  are sent (as request fields); the server's own configuration decides the rest. 429/5xx answers are
  retried by the ``openai`` client (it honours ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from ..config import Settings
from ..documents import Page, PageResult

log = logging.getLogger(__name__)


@dataclass
class PageAnswer:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PageError(Exception):
    """One page could not be read (the engine or the server refused it); fails its document."""


class FatalError(Exception):
    """Nothing can be read (the model does not load, the server is unreachable): the run stops."""


#: ``figures(page_number, index, crop) -> link``: where a document's figure crops go
Figures = Callable[[int, int, Image.Image], str | None]


class Engine(Protocol):
    def describe(self) -> str:
        """One line for the log: what reads the pages."""
        ...

    async def start(self) -> None:
        """Get ready (load the model / check the server); idempotent. FatalError when impossible."""
        ...

    def run_pages(self, pages: list[Page], figures: Figures) -> AsyncIterator[PageResult]:
        """The post-processed result of every page (in any order); PageError when one fails."""
        ...

    async def close(self, *, interrupted: bool = False) -> None: ...


async def in_daemon_thread(fn: Any, *args: Any) -> Any:
    """Run a blocking call (a model load, an engine shutdown) in a daemon thread: unlike
    ``asyncio.to_thread`` it never makes Ctrl-C wait for the call to end."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def work() -> None:
        try:
            result, ok = fn(*args), True
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
            result, ok = exc, False
        try:
            loop.call_soon_threadsafe(settle, ok, result)
        except RuntimeError:  # the loop is gone (interrupted run): nobody waits for it
            pass

    threading.Thread(target=work, name="ocr-batch-blocking", daemon=True).start()
    return await fut


class InProcessEngine:
    """Pages go through ``documents.run_jobs`` (the API's document path) into the server's engine."""

    def __init__(self, settings: Settings, model_id: str, prompt: str | None, jobs: int) -> None:
        from ..documents import request_template

        self.settings = settings
        self.model_id = model_id
        self.kind = settings.entry(model_id).kind
        self.template = request_template(settings, model_id, prompt=prompt)
        self.jobs = jobs
        self.manager: Any = None

    def describe(self) -> str:
        inf = self.settings.inference_for(self.model_id)
        quant = f", {inf.quantize}" if inf.quantize else ""
        return f"model {self.model_id} in this process ({inf.device}, {inf.effective_dtype}{quant})"

    async def start(self) -> None:
        from ..engine.manager import ModelManager

        if self.manager is not None:
            return
        from ..server import build_loader

        srv = self.settings.server
        # The run keeps at most ``jobs`` pages in the engine, so the queue never refuses one, and a
        # page may wait as long as the pages before it take.
        self.manager = ModelManager(
            [self.model_id],
            build_loader(self.settings),
            max_running=srv.max_running,
            max_queued=max(self.jobs, 1),
            queue_timeout_s=10.0**9,
            prefill_slice_s=srv.prefill_slice_s,
        )
        try:
            await in_daemon_thread(self.manager.load_sync, self.model_id)
        except Exception as exc:  # noqa: BLE001 - reported as the run's reason to stop
            raise FatalError(str(exc)) from None

    async def run_pages(self, pages: list[Page], figures: Figures) -> AsyncIterator[PageResult]:
        from ..documents import DocumentOptions, PageDone, page_jobs, run_jobs
        from ..engine.errors import EngineError

        events = run_jobs(self.manager, page_jobs(pages, self.template), self.kind,
                          DocumentOptions(figures=figures), model_id=self.model_id)  # fmt: skip
        try:
            async for ev in events:
                if isinstance(ev, PageDone):
                    yield ev.result
        except EngineError as exc:
            msg = str(exc)  # a multi-page group names the page itself
            raise PageError(msg if msg.startswith("page ") else f"page {pages[0].number}: {msg}") from None
        finally:
            await events.aclose()

    async def close(self, *, interrupted: bool = False) -> None:
        if self.manager is not None:
            # after Ctrl-C do not wait for a prefill in progress: the worker thread is a daemon
            await in_daemon_thread(self.manager.scheduler.shutdown, 2.0 if interrupted else 60.0)


#: flag (settings key) -> Chat Completions request field, for --server mode
REQUEST_FIELDS = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "do_sample": "do_sample",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
    "base_size": "base_size",
    "image_size": "image_size",
    "crop_mode": "crop_mode",
}
_STANDARD = {"max_tokens", "temperature", "top_p", "seed"}


def api_base(url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` -> ``http://host:8000/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class HttpEngine:
    """Each page is one Chat Completions request; the family's post-processor runs here on the answer."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        model_id: str,
        kind: str,
        prompt: str | None,
        fields: dict[str, Any],
        timeout_s: float,
    ) -> None:
        self.base_url = api_base(url)
        self.api_key = api_key
        self.model_id = model_id
        self.kind = kind
        self.prompt = prompt
        self.fields = {REQUEST_FIELDS[k]: v for k, v in fields.items() if k in REQUEST_FIELDS}
        self.timeout_s = timeout_s
        self.client: Any = None

    def describe(self) -> str:
        return f"model {self.model_id} on {self.base_url}"

    async def start(self) -> None:
        import openai

        if self.client is not None:
            return
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key or "unused", timeout=self.timeout_s, max_retries=5
        )
        try:
            models = [m.id async for m in self.client.models.list()]
        except openai.AuthenticationError:
            raise FatalError(
                f"{self.base_url}: the server refused the API key (401); pass --api-key "
                "or set DEEPSEEK_OCR_API_KEY"
            ) from None
        except openai.APIConnectionError as exc:
            raise FatalError(f"cannot reach {self.base_url}: {exc}") from None
        except openai.APIError as exc:
            raise FatalError(f"{self.base_url}/models: {exc}") from None
        if self.model_id not in models:
            raise FatalError(
                f"{self.base_url} does not serve model {self.model_id!r} "
                f"(it serves: {', '.join(models) or 'nothing'}); pick one with --model"
            )

    async def ocr(self, image: Image.Image) -> PageAnswer:
        import openai

        url = await asyncio.to_thread(png_data_url, image)
        content: list[dict[str, Any]] = []
        if self.prompt:
            content.append({"type": "text", "text": self.prompt})
        content.append({"type": "image_url", "image_url": {"url": url}})
        std = {k: v for k, v in self.fields.items() if k in _STANDARD}
        extra = {k: v for k, v in self.fields.items() if k not in _STANDARD}
        try:
            out = await self.client.chat.completions.create(
                model=self.model_id,
                messages=[{"role": "user", "content": content}],
                extra_body=extra or None,
                **std,
            )
        except openai.APIStatusError as exc:
            raise PageError(f"the server answered {exc.status_code}: {_message(exc)}") from None
        except openai.APIConnectionError as exc:
            raise PageError(f"cannot reach {self.base_url}: {exc}") from None
        choice = out.choices[0]
        usage = out.usage
        return PageAnswer(
            choice.message.content or "",
            choice.finish_reason or "stop",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    async def _page(self, page: Page, figures: Figures) -> PageResult:
        from .pipeline import page_from_text

        try:
            ans = await self.ocr(page.image)
        except PageError as exc:
            raise PageError(f"page {page.number}: {exc}") from None
        return page_from_text(self.kind, page, ans.text, ans.finish_reason, ans.prompt_tokens,
                              ans.completion_tokens, figures)  # fmt: skip

    async def run_pages(self, pages: list[Page], figures: Figures) -> AsyncIterator[PageResult]:
        tasks = [asyncio.create_task(self._page(p, figures)) for p in pages]
        try:
            for fut in asyncio.as_completed(tasks):
                yield await fut
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self, *, interrupted: bool = False) -> None:
        if self.client is not None:
            await self.client.close()


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(exc, "message", exc))
