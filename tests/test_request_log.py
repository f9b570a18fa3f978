"""One log line per request (streams, errors and cancellations included), and ``--log-format json``."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from fixtures.server import RunningServer, data_url, png_bytes

from deepseek_ocr_server.logs import JsonFormatter, TextFormatter

PARTS = [{"type": "text", "text": "read"}, {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]


def _records(caplog: pytest.LogCaptureFixture, n: int) -> list[dict]:
    deadline = time.monotonic() + 10  # the line is written when the server has finished the response
    while time.monotonic() < deadline:
        got = [r.fields for r in caplog.records if r.name == "deepseek_ocr_server.requests"]
        if len(got) >= n:
            return got
        time.sleep(0.01)
    return [r.fields for r in caplog.records if r.name == "deepseek_ocr_server.requests"]


def test_one_line_per_request(api_server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="deepseek_ocr_server.requests")
    with httpx.Client(timeout=60) as http:
        ok = http.post(
            api_server.v1 + "/chat/completions",
            json={"model": "fake-a", "messages": [{"role": "user", "content": PARTS}], "max_tokens": 3},
        )
        usage = ok.json()["usage"]
        http.post(
            api_server.v1 + "/chat/completions", json={"model": "fake-a", "messages": [], "max_tokens": 3}
        )
        # a stream the client leaves after two events
        body = {"model": "fake-slow", "stream": True, "messages": [{"role": "user", "content": PARTS}]}
        with http.stream("POST", api_server.v1 + "/chat/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 2:
                    break
    lines = _records(caplog, 3)
    assert len(lines) == 3, lines
    first, bad, cut = lines
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions" and first["status"] == 200
    assert first["model"] == "fake-a" and first["finish"] in ("stop", "length")
    assert (
        first["prompt_tokens"] == usage["prompt_tokens"]
        and first["completion_tokens"] == usage["completion_tokens"]
    )
    assert first["ttft_s"] >= 0 and first["total_s"] >= first["ttft_s"]
    assert bad["status"] == 400 and bad["error"] == "invalid_value" and "finish" not in bad
    assert cut["model"] == "fake-slow" and cut["status"] == 200 and cut["finish"] == "cancelled"


def test_formats() -> None:
    record = logging.LogRecord(
        "deepseek_ocr_server.requests", logging.INFO, __file__, 1, "request", None, None
    )
    record.fields = {"status": 200, "model": "fake a", "ttft_s": 0.0812, "error": None}
    text = TextFormatter().format(record)
    assert text.endswith('request status=200 model="fake a" ttft_s=0.081'), text
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "request" and data["status"] == 200 and data["ttft_s"] == 0.0812
    assert "error" not in data and data["level"] == "INFO" and data["time"].endswith("Z")


def test_cli_log_format_json(tmp_path, capfd) -> None:  # noqa: ANN001
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_ocr_server.cli",
            "--log-format",
            "json",
            "--config",
            str(tmp_path / "c.toml"),
            "--model",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "nope" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "deepseek_ocr_server.cli", "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--log-format" in proc.stderr
