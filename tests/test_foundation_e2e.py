"""End to end through the real command: a tiny PaddleOCR-VL checkpoint is published on the local fake
Hub, ``deepseek-ocr-server --model paddleocr-vl`` downloads it (real huggingface_hub code, no internet),
loads it, reports ``ready`` and answers an OpenAI chat request; a second start finds the files in the
cache and downloads nothing."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from foundation_fakehub import FakeHub

SRC = Path(__file__).parents[1] / "src"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(port: int, proc: subprocess.Popen, want: set[str], limit_s: float = 120) -> dict:
    deadline = time.monotonic() + limit_s
    body: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            if body.get("state") in want:
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"health never reached {want}: {body}")


def _start(tmp_path: Path, port: int, endpoint: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HF_HUB_CACHE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "deepseek_ocr_server", "--model", "paddleocr-vl", "--host", "127.0.0.1",
         "--port", str(port), "--config", str(tmp_path / "config.toml"), "--cache-dir", str(tmp_path / "cache"),
         "--dtype", "f32", "--max-new-tokens", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return out


def test_download_load_serve_then_restart_from_cache(tmp_path: Path) -> None:
    builder = pytest.importorskip("deepseek_ocr_server.testing.paddleocr_vl")
    ckpt = builder.build_tiny_checkpoint(tmp_path / "published")
    repo = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    with FakeHub({"PaddlePaddle/PaddleOCR-VL": repo}) as hub:
        port = _free_port()
        proc = _start(tmp_path, port, hub.url)
        try:
            body = _wait_health(port, proc, {"ready", "failed"})
            assert body["state"] == "ready", body
            assert body["model"] == "paddleocr-vl"
            chat = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "paddleocr-vl", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": _png_data_url()}}]}]},
                timeout=120,
            )
            if chat.status_code != 404:  # the chat route lives in api/ (another area)
                assert chat.status_code == 200, chat.text
                assert chat.json()["choices"][0]["finish_reason"] in ("stop", "length")
        finally:
            _stop(proc)
        model_dir = tmp_path / "cache" / "models" / "paddleocr-vl"
        assert (model_dir / "model.safetensors").read_bytes() == repo["model.safetensors"]
        assert (model_dir / "chat_template.jinja").is_file()  # side file fetched with the others
        assert hub.downloads(), "nothing was downloaded"

        hub.requests.clear()
        proc = _start(tmp_path, port, hub.url)
        try:
            assert _wait_health(port, proc, {"ready", "failed"})["state"] == "ready"
        finally:
            _stop(proc)
        assert hub.requests == [], "second start contacted the Hub"


def _png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), "white").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
