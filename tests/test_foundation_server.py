"""Server skeleton: wiring settings -> assets -> models -> manager -> app, and the real command
started as a subprocess with no network: /health reports why the model failed; SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from deepseek_ocr_server import server
from deepseek_ocr_server.config import builtin_models, load_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loader_resolves_assets_and_passes_device_dtype_quantize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (d / name).write_text("{}")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[models.entries.paddleocr-vl]\ndtype = "f32"\nweights = "{d}/model.safetensors"\n'
                   f'config = "{d}/config.json"\ntokenizer = "{d}/tokenizer.json"\n')
    settings = load_settings({"quantize": "int8", "cache_dir": tmp_path / "cache"}, cfg)
    calls = []
    monkeypatch.setattr("deepseek_ocr_server.models.load_model",
                        lambda kind, files, **kw: calls.append((kind, files, kw)) or "MODEL")
    assert server.build_loader(settings)("paddleocr-vl") == "MODEL"
    kind, files, kw = calls[0]
    assert kind == "paddleocr-vl" and files.weights == d / "model.safetensors" and files.config == d / "config.json"
    assert kw == {"device": "cpu", "dtype": torch.float32, "quantize": "int8"}


def test_app_reports_a_failed_preload(tmp_path: Path) -> None:
    settings = load_settings({"cache_dir": tmp_path / "cache"}, tmp_path / "c.toml")
    app, manager = server.build_app(settings)
    assert manager.model_ids() == list(builtin_models())

    async def go() -> dict:
        await manager.preload("deepseek-ocr")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(500):
                body = (await client.get("/health")).json()
                if body["state"] == "failed":
                    return body
                await asyncio.sleep(0.02)
        raise AssertionError(f"never failed: {body}")

    body = asyncio.run(go())
    assert "config.json" in body["error"] and "deepseek-ai/DeepSeek-OCR" in body["error"]


def test_real_command_offline_health_then_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "XDG_CACHE_HOME": str(tmp_path / "xdgcache")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepseek_ocr_server", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        body = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                if body["state"] == "failed":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert body is not None and body["state"] == "failed", body
        assert body["model"] == "deepseek-ocr"
        assert "config.json" in body["error"] and "HF_HUB_OFFLINE" in body["error"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    config = tmp_path / "xdg" / "deepseek-ocr" / "config.toml"
    assert config.is_file()
    assert f"config file: {config}" in out
    assert "active model: deepseek-ocr" in out and "device: cpu, dtype: auto" in out
    assert "cpu class " in out and "precision: auto (cpu class " in out  # one line each, at the load
    assert "Traceback" not in out


def test_busy_port_exits_1_before_loading_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
               "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        out = subprocess.run(
            [sys.executable, "-m", "deepseek_ocr_server", "--host", "127.0.0.1", "--port", str(port),
             "--config", str(tmp_path / "c.toml"), "--cache-dir", str(tmp_path / "cache")],
            env=env, capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "fetching" not in out.stderr and "Traceback" not in out.stderr


def test_sigterm_during_a_download_exits_0_without_waiting(tmp_path: Path) -> None:
    """The model download hangs (the fake Hub holds the file); SIGTERM must still stop the server."""
    from foundation_fakehub import FakeHub

    files = {"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors": b"x" * 100}
    with FakeHub({"deepseek-ai/DeepSeek-OCR": files}) as hub:
        hub.gate.clear()  # every file download blocks until the test ends
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepseek_ocr_server", "--host", "127.0.0.1", "--port", str(port),
             "--config", str(tmp_path / "c.toml"), "--cache-dir", str(tmp_path / "cache")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not any(m == "GET" and "/resolve/" in p for m, p in hub.requests):
                assert proc.poll() is None
                time.sleep(0.05)
            body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            assert body["state"] == "loading", body
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)  # far less than the held download (120 s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out
    assert "not waiting for it" in out
    assert not (tmp_path / "cache" / "models" / "deepseek-ocr" / "config.json").exists()


def test_server_limits_reach_the_engine(tmp_path: Path) -> None:
    settings = load_settings({"max_running": 3, "max_queued": 5, "queue_timeout": 7.0, "cache_dir": tmp_path},
                             tmp_path / "c.toml")
    _, manager = server.build_app(settings)
    sch = manager.scheduler
    assert (sch.max_running, sch.max_queued, sch.queue_timeout_s) == (3, 5, 7.0)
