"""The real ``deepseek-ocr-server`` process: graceful SIGTERM (running streams drain, then end with an
error event; exit 0, no traceback), header/body read timeouts and the connection cap."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fixtures.server import FAKE_OPTIONS, data_url, free_port, png_bytes

from deepseek_ocr_server.testing.fake import write_fake_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _config(tmp: Path, port: int) -> Path:
    entries = []
    for mid in ("fake-a", "fake-slow"):
        files = write_fake_checkpoint(tmp / mid, **FAKE_OPTIONS[mid])
        entries.append(
            f'[models.entries.{mid}]\nkind = "fake"\nconfig = "{files.config}"\ntokenizer = "{files.tokenizer}"\n'
            f'weights = "{files.weights}"\n'
        )
    text = (
        f'[models]\nactive = "fake-a"\ncache_dir = "{tmp / "cache"}"\n\n'
        + "\n".join(entries)
        + f'\n[server]\nhost = "127.0.0.1"\nport = {port}\nheader_timeout_s = 1.0\nbody_timeout_s = 1.0\n'
        "max_connections = 20\nshutdown_drain_s = 1.0\n"
    )
    path = tmp / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def server(tmp_path: Path):  # noqa: ANN201
    port = free_port()
    cfg = _config(tmp_path, port)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("DEEPSEEK_OCR_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepseek_ocr_server.cli", "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1])
        time.sleep(0.1)
    yield base, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _partial_request(base: str, data: bytes) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    sock.sendall(data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_sigterm_drains_then_ends_streams_with_an_error(server) -> None:  # noqa: ANN001
    base, proc = server
    # slowloris: headers never completed -> closed by the server (the recv returns, it does not time out)
    slow = _partial_request(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert _read_all(slow) == b""
    # the same on a keep-alive connection: one complete request and its answer, then a next request
    # whose headers never complete (its first bytes cancel uvicorn's own keep-alive timeout)
    kept = _partial_request(base, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        answer += kept.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    assert _read_all(kept) == b""
    # a body that never comes -> 408
    lazy = _partial_request(
        base,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100\r\n\r\n{",
    )
    assert _read_all(lazy).startswith(b"HTTP/1.1 408")
    # connection cap: beyond 20 open connections, new ones are closed at once
    held = [_partial_request(base, b"") for _ in range(20)]
    extra = _partial_request(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_all(extra) == b""
    for s in held:
        s.close()

    body = {
        "model": "fake-slow",
        "stream": True,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}
        ],
    }
    events: list[str] = []
    with httpx.Client(timeout=60) as http, http.stream("POST", base + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                events.append(line)
            if len(events) >= 3:
                break
        proc.send_signal(signal.SIGTERM)
        events += [line for line in lines if line.startswith("data:")]
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert events[-1] != "data: [DONE]"
    last = json.loads(events[-1].removeprefix("data:"))
    assert "shutting down" in last["error"]["message"], last
    assert "shutting down" in err
