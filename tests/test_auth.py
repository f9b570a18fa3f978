"""Authentication: refused before the body is read, no silent "no auth", UTF-8 keys, and no redirect
built from the client's Host header."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from fixtures.server import RunningServer, fake_settings, serve

from deepseek_ocr_server.config import API_KEY_ENV, ConfigError, load_settings


def _raw_request(base_url: str, head: bytes, body: bytes = b"") -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_unauthenticated_request_is_refused_before_its_body(strict_server: RunningServer) -> None:
    # announce a 200 KB body and send none of it: the 401 must come without the body being read
    # (before the fix the server waited for the body and this read timed out)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer wrong\r\nContent-Length: 200000\r\n\r\n"
    )
    reply = _raw_request(strict_server.base_url, head)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    r = httpx.post(strict_server.v1 + "/chat/completions", json={"model": "fake-a"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_non_ascii_key_matches_utf8_clients(fake_checkpoints, tmp_path: Path) -> None:  # noqa: ANN001
    key = "clé-ключ-鍵"
    for running in serve(fake_settings(tmp_path, fake_checkpoints, api_key=key)):
        header = b"Bearer " + key.encode("utf-8")
        ok = httpx.get(running.v1 + "/models", headers=[(b"Authorization", header)], timeout=30)
        assert ok.status_code == 200, ok.text
        bad = httpx.get(
            running.v1 + "/models",
            headers=[(b"Authorization", b"Bearer " + key.encode("latin-1", "replace"))],
            timeout=30,
        )
        assert bad.status_code == 401


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_api_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    cfg = tmp_path / "c.toml"
    with pytest.raises(ConfigError, match="api.key.*empty"):
        load_settings({"api_key": value}, cfg)
    monkeypatch.setenv(API_KEY_ENV, value)
    with pytest.raises(ConfigError, match=API_KEY_ENV):
        load_settings({}, cfg)
    monkeypatch.delenv(API_KEY_ENV)
    cfg.write_text(f'[server]\napi_key = "{value}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="api_key"):
        load_settings({}, cfg)


def test_cli_refuses_an_empty_api_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_ocr_server.cli",
            "--api-key",
            "",
            "--config",
            str(tmp_path / "c.toml"),
            "--port",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "empty" in proc.stderr, proc.stderr


def test_host_header_does_not_drive_redirects(api_server: RunningServer) -> None:
    for path in ("/v1/models/", "/v1/chat/completions/", "/health/"):
        r = httpx.get(
            api_server.base_url + path, headers={"Host": "evil.example"}, timeout=30, follow_redirects=False
        )
        assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code, r.headers)
