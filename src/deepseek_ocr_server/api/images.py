"""Image inputs: ``data:`` URLs and ``http(s)`` URLs -> normalised RGB ``PIL.Image``.

Remote fetches go through httpcore with a guarded network backend: every connection (first hop and
every redirect) resolves the host itself, refuses the request if ANY resolved address is private,
loopback, link-local, multicast, reserved or unspecified (unless the operator allows private URLs),
and then connects to the checked address, so DNS rebinding between check and connect cannot slip
through. Downloads have a total timeout, a byte cap and a small redirect limit.

Decoding runs in a worker thread; a pixel cap is checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse
import warnings
from typing import Any

import httpcore
from PIL import Image, UnidentifiedImageError

from ..config import ServerSettings
from ..imaging import normalise
from .errors import ApiError, human_bytes, human_pixels

#: redirects followed when fetching one image URL
MAX_REDIRECTS = 3

_USER_AGENT = "deepseek-ocr-server (image fetch)"


def _bad(message: str, param: str | None, code: str = "invalid_image") -> ApiError:
    return ApiError(message, status=400, param=param, code=code)


# ------------------------------------------------------------------------------------------------
# address guard


class BlockedAddress(Exception):
    """The URL's host resolves to an address the server may not contact."""


def ip_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return ip_is_public(mapped)
        if ip.teredo is not None:
            return ip_is_public(ip.teredo[1])
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


async def resolve_checked(host: str, port: int, allow_private: bool) -> list[str]:
    """Resolve ``host`` and return its addresses; raise BlockedAddress if any is not public."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addrs = [str(literal)]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve host {host!r}: {exc}") from exc
        addrs = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addrs:
        raise httpcore.ConnectError(f"cannot resolve host {host!r}")
    if not allow_private:
        for a in addrs:
            if not ip_is_public(ipaddress.ip_address(a)):
                raise BlockedAddress(
                    f"image URL host {host!r} resolves to a non-public address ({a}); "
                    "the server refuses private, loopback and link-local addresses"
                )
    return addrs


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Network backend that checks the resolved addresses at connect time."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        addrs = await resolve_checked(host, port, self._allow_private)
        last: Exception | None = None
        for addr in addrs:
            try:
                return await self._inner.connect_tcp(
                    addr, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# ------------------------------------------------------------------------------------------------
# fetching


def _check_scheme(url: str, param: str | None) -> urllib.parse.SplitResult:
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # a port beyond 0..65535 raises ValueError here, not later in the fetch
    except ValueError as exc:
        raise _bad(f"invalid image URL: {exc}", param, "invalid_image_url") from None
    if parts.scheme not in ("http", "https"):
        raise _bad(
            f"unsupported image URL scheme {parts.scheme + ':' if parts.scheme else '(none)'}; "
            "use a data: URL (base64) or an http(s) URL",
            param,
            "invalid_image_url",
        )
    if not parts.hostname:
        raise _bad("image URL has no host", param, "invalid_image_url")
    return parts


async def fetch_url(
    url: str, opts: ServerSettings, param: str | None = None, max_redirects: int = MAX_REDIRECTS
) -> bytes:
    """Download ``url`` with the limits in ``opts``; every failure is a 400 ApiError."""
    _check_scheme(url, param)
    try:
        async with asyncio.timeout(opts.image_fetch_timeout_s):
            async with httpcore.AsyncConnectionPool(
                network_backend=_GuardedBackend(opts.allow_private_image_urls), retries=0, max_connections=4
            ) as pool:
                current = url
                for _hop in range(max_redirects + 1):
                    parts = _check_scheme(current, param)
                    headers = [
                        (b"Host", _host_header(parts)),
                        (b"User-Agent", _USER_AGENT.encode()),
                        (b"Accept", b"image/*,*/*;q=0.5"),
                        (b"Accept-Encoding", b"identity"),
                    ]
                    async with pool.stream("GET", current, headers=headers) as resp:
                        if resp.status in (301, 302, 303, 307, 308):
                            loc = dict((k.lower(), v) for k, v in resp.headers).get(b"location")
                            if not loc:
                                raise _bad(f"image URL redirect without Location ({resp.status})", param,
                                           "invalid_image_url")
                            current = urllib.parse.urljoin(current, loc.decode("latin-1"))
                            continue
                        if resp.status != 200:
                            raise _bad(f"fetching the image URL failed: HTTP {resp.status}", param,
                                       "image_fetch_failed")
                        length = dict((k.lower(), v) for k, v in resp.headers).get(b"content-length")
                        if length is not None and length.isdigit() and int(length) > opts.image_fetch_max_bytes:
                            raise _too_big(opts, param)
                        buf = bytearray()
                        async for chunk in resp.aiter_stream():
                            buf += chunk
                            if len(buf) > opts.image_fetch_max_bytes:
                                raise _too_big(opts, param)
                        return bytes(buf)
                raise _bad(f"image URL redirected more than {max_redirects} times", param, "image_fetch_failed")
    except ApiError:
        raise
    except BlockedAddress as exc:
        raise ApiError(str(exc), status=400, param=param, code="image_url_forbidden") from None
    except TimeoutError:
        raise _bad(f"fetching the image URL timed out after {opts.image_fetch_timeout_s:g} s", param,
                   "image_fetch_failed") from None
    except httpcore.TimeoutException as exc:
        raise _bad(f"fetching the image URL timed out: {exc}", param, "image_fetch_failed") from None
    except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.UnsupportedProtocol, OSError) as exc:
        raise _bad(f"could not fetch the image URL: {exc or type(exc).__name__}", param, "image_fetch_failed") from None


def _host_header(parts: urllib.parse.SplitResult) -> bytes:
    host = parts.hostname or ""
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    if ":" in host:
        host = f"[{host}]"
    return (host if parts.port is None else f"{host}:{parts.port}").encode("ascii", "replace")


def _too_big(opts: ServerSettings, param: str | None) -> ApiError:
    return _bad(f"The image is larger than the limit of {human_bytes(opts.image_fetch_max_bytes)}.", param, "image_too_large")


def decode_data_url(url: str, opts: ServerSettings, param: str | None = None) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise _bad("malformed data: URL (no comma)", param, "invalid_image_url")
    meta = head[5:].split(";")
    if "base64" not in [m.strip().lower() for m in meta[1:]]:
        raise _bad("data: URLs must be base64-encoded (data:image/png;base64,...)", param, "invalid_image_url")
    mime = meta[0].strip().lower()
    if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
        raise _bad(f"data: URL media type {mime!r} is not an image", param, "invalid_image")
    payload = "".join(urllib.parse.unquote(payload).split())
    if len(payload) > (opts.image_fetch_max_bytes * 4) // 3 + 4:
        raise _too_big(opts, param)
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("invalid base64 in the image data: URL", param, "invalid_base64") from None
    if not data:
        raise _bad("empty image in data: URL", param, "invalid_image")
    return data


# ------------------------------------------------------------------------------------------------
# decoding


def image_pixels(data: bytes, opts: ServerSettings, param: str | None = None) -> int:
    """Pixels of the encoded image ``data``, read from its header (nothing decoded); 400 when it is not
    an image or exceeds the per-image limit."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except UnidentifiedImageError:
        raise _bad("the image data is not a supported image format", param) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bad("image exceeds the pixel limit (decompression bomb guard)", param, "image_too_large") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _bad(f"the image could not be decoded: {exc}", param) from None
    if w < 1 or h < 1:
        raise _bad("image has no pixels", param)
    if w * h > opts.max_image_pixels:
        raise _bad(
            f"The image is {w}x{h} pixels ({human_pixels(w * h)}), more than the limit of "
            f"{human_pixels(opts.max_image_pixels)}.",
            param,
            "image_too_large",
        )
    return w * h


def decode_image(data: bytes, opts: ServerSettings, param: str | None = None) -> Image.Image:
    """Bytes -> normalised RGB image (blocking: call from a worker thread)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w < 1 or h < 1:
                raise _bad("image has no pixels", param)
            if w * h > opts.max_image_pixels:
                raise _bad(
                    f"The image is {w}x{h} pixels ({human_pixels(w * h)}), more than the limit of "
                    f"{human_pixels(opts.max_image_pixels)}.",
                    param,
                    "image_too_large",
                )
            img.load()
            out = normalise(img)
            out.load()
            return out
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise _bad("the image data is not a supported image format", param) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bad("image exceeds the pixel limit (decompression bomb guard)", param, "image_too_large") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise _bad(f"the image could not be decoded: {exc}", param) from None


async def image_bytes(url: str, opts: ServerSettings, param: str | None = None) -> bytes:
    """The encoded bytes of a data: or http(s) image URL. Every failure is a 400 ApiError."""
    if not isinstance(url, str) or not url.strip():
        raise _bad("image URL is empty", param, "invalid_image_url")
    url = url.strip()
    if url[:5].lower() == "data:":
        return decode_data_url(url, opts, param)
    return await fetch_url(url, opts, param)


async def load_image(url: str, opts: ServerSettings, param: str | None = None) -> Image.Image:
    """A data: or http(s) image URL -> normalised RGB image. Every failure is a 400 ApiError."""
    data = await image_bytes(url, opts, param)
    return await asyncio.to_thread(decode_image, data, opts, param)
