"""The image-URL guard at connection time: DNS answers and redirects are checked, not just the URL."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from deepseek_ocr_server.api import images
from deepseek_ocr_server.api.errors import ApiError
from deepseek_ocr_server.config import ServerSettings


@pytest.fixture()
def only_127_0_0_1_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend 127.0.0.1 is a public address (the test server's), everything else keeps the real rule."""
    real = images.ip_is_public
    monkeypatch.setattr(images, "ip_is_public", lambda ip: ip == ipaddress.ip_address("127.0.0.1") or real(ip))

    real_getaddrinfo = asyncio.AbstractEventLoop.getaddrinfo
    names = {"good.test": ["127.0.0.1"], "evil.test": ["127.0.0.2"], "mixed.test": ["127.0.0.1", "10.0.0.7"]}

    async def fake_getaddrinfo(self, host, port, *args, **kwargs):  # noqa: ANN001, ANN202
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in names[host]]
        return await real_getaddrinfo(self, host, port, *args, **kwargs)

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)


def _fetch(url: str, **kw: object) -> bytes:
    redirects = kw.pop("max_redirects", images.MAX_REDIRECTS)
    return asyncio.run(images.fetch_url(url, ServerSettings(**kw), "p", max_redirects=redirects))  # type: ignore[arg-type]


def test_guard_checks_dns_and_redirects(only_127_0_0_1_public: None, image_server) -> None:  # noqa: ANN001
    port = image_server.base_url.rsplit(":", 1)[1]
    assert _fetch(f"http://good.test:{port}/page.png") == image_server.files["/page.png"]
    assert _fetch(image_server.url("/redirect")) == image_server.files["/page.png"]
    for url in (f"http://evil.test:{port}/page.png", f"http://mixed.test:{port}/page.png",
                image_server.url("/redirect-elsewhere")):
        with pytest.raises(ApiError) as e:
            _fetch(url)
        assert e.value.code == "image_url_forbidden" and e.value.status == 400, url
    # the operator may allow private addresses: then the connection is attempted (and refused, since
    # the test server listens on 127.0.0.1 only)
    with pytest.raises(ApiError) as e:
        _fetch(image_server.url("/redirect-elsewhere"), allow_private_image_urls=True)
    assert e.value.code == "image_fetch_failed"


def test_fetch_limits(image_server) -> None:  # noqa: ANN001
    with pytest.raises(ApiError) as e:
        _fetch(image_server.url("/redirect"), allow_private_image_urls=True, max_redirects=0)
    assert e.value.code == "image_fetch_failed"
    with pytest.raises(ApiError) as e:
        _fetch(image_server.url("/page.png"), allow_private_image_urls=True, image_fetch_max_bytes=10)
    assert e.value.code == "image_too_large"
