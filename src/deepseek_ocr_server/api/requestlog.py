"""One log line per HTTP request (logger ``deepseek_ocr_server.requests``), written when the response
has ended, streams and cancellations included: method, path, status, model, prompt/completion tokens,
finish reason (``cancelled`` when the client left first), time to first token, total time, and the
error code of an error answer. Polling endpoints (``/health``, ``/ready``, ``/metrics``) log at DEBUG.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("deepseek_ocr_server.requests")

_QUIET = {"/health", "/ready", "/metrics"}


@dataclass
class RequestLog:
    method: str
    path: str
    t0: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    ttft_s: float | None = None
    error: str | None = None
    gen: Any = None  # the api's Generation, once the engine accepted the request
    req: Any = None  # the engine request: its decoded-image share is returned at the end at the latest
    _body: bytearray = field(default_factory=bytearray)

    def first_event(self) -> None:
        self.ttft_s = time.perf_counter() - self.t0

    def response_body(self, chunk: bytes, more: bool) -> None:
        """Collect a small error body to log its ``error.code``."""
        if self.status < 400 or len(self._body) > 4096:
            return
        self._body += chunk
        if not more:
            try:
                self.error = (
                    json.loads(self._body)["error"]["code"] or json.loads(self._body)["error"]["type"]
                )
            except (ValueError, KeyError, TypeError):
                pass

    def emit(self) -> None:
        release = getattr(self.req, "release_images", None)
        if release is not None:
            release()  # idempotent; usually already returned after preprocessing
        fields: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "status": self.status or None,
            "model": self.model,
        }
        gen = self.gen
        fin = getattr(gen, "finished", None)
        failed = getattr(gen, "failed", None)
        if fin is not None:
            fields.update(
                prompt_tokens=fin.prompt_tokens,
                completion_tokens=fin.completion_tokens,
                finish=fin.finish_reason,
            )
        elif failed is not None:
            fields.update(finish="error", error=failed.type)
        elif gen is not None or self.status == 499:
            fields["finish"] = "cancelled"
        fields["ttft_s"] = round(self.ttft_s, 4) if self.ttft_s is not None else None
        fields["total_s"] = round(time.perf_counter() - self.t0, 4)
        if self.error and "error" not in fields:
            fields["error"] = self.error
        level = logging.DEBUG if self.path in _QUIET else logging.INFO
        log.log(level, "request", extra={"fields": fields})
