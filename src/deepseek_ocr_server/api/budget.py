"""Decoded image pixels in flight, bounded across all requests.

A request's images are decoded only after its share of ``max_pixels_in_flight`` is granted (a request
that finds the budget spent gets 429 with ``Retry-After``; one that could never fit gets 400). The
share is returned when the engine has preprocessed the images (it drops the decoded pictures then) or
when the request ends, whichever comes first. After a large share is returned the C heap is trimmed,
so that the process gives the memory of big decoded pictures back to the system instead of keeping it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

from .errors import ApiError, human_pixels

log = logging.getLogger(__name__)

#: a returned share at least this large trims the C heap (decoded pictures are freed by then)
TRIM_PIXELS = 8_000_000


def _load_malloc_trim():  # noqa: ANN202 - a ctypes function or None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load_malloc_trim()


def trim_heap() -> None:
    """Give freed C-heap pages back to the system (glibc keeps them otherwise)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class PixelLease:
    """A granted share; ``release()`` is idempotent and thread-safe."""

    def __init__(self, budget: PixelBudget, pixels: int) -> None:
        self._budget = budget
        self.pixels = pixels
        self._released = False

    def release(self) -> None:
        with self._budget._lock:
            if self._released:
                return
            self._released = True
            self._budget._used -= self.pixels
        if self.pixels >= TRIM_PIXELS:
            threading.Thread(target=trim_heap, name="ocr-heap-trim", daemon=True).start()


class PixelBudget:
    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def acquire(self, pixels: int) -> PixelLease:
        """Grant ``pixels`` now, or raise: 400 when they can never fit, 429 while others hold the budget."""
        if pixels > self.max_pixels:
            raise ApiError(
                f"The images of this request have {human_pixels(pixels)} in total; this server decodes at most "
                f"{human_pixels(self.max_pixels)} at a time. Send smaller or fewer images.",
                code="image_too_large",
            )
        with self._lock:
            if self._used + pixels > self.max_pixels:
                raise ApiError(
                    "The server is busy decoding other images; retry shortly.",
                    status=429,
                    type="rate_limit_error",
                    code="server_overloaded",
                    headers={"Retry-After": "1"},
                )
            self._used += pixels
        return PixelLease(self, pixels)
