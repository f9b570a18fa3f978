"""Ray Serve overhead: the same model, the same requests, through the single-process server and through
``deepseek-ocr-server --ray`` (a local Ray instance on this machine, one replica holding the model with
all the CPUs, the HTTP ingress in front of it), one after the other in the same invocation.

Reports, per mode, the medians over ``--repeat`` rounds of: one stream's decode tokens/s (client side,
first to last token) and time to first token, and the aggregate end-to-end tokens/s of 8 concurrent
streams; then the ratios ray / single (targets: <= 5 % tokens/s lost, <= 50 ms TTFT added).

    flock -x /tmp/ocr-heavy.lock env PYTHONPATH=src python bench/bench_ray.py --model paddleocr-vl
    PYTHONPATH=src python bench/bench_ray.py --model paddleocr-vl --repeat 1 --max-tokens 16   # quick

Checkpoints: ``--ckpt DIR`` (default ``/work/cache/<model>-full``, the random full-size checkpoints that
``serve_bench.py`` uses). Needs the ``[ray]`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from probe import add_cpu_class_argument, apply_cpu_class
from serve_bench import KINDS, REPO, free_port, one_stream, request_body, summarize, write_config


def start(args: argparse.Namespace, cfg: Path, tmp: Path, ray: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "deepseek_ocr_server",
        "--config",
        str(cfg),
        "--model",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--cache-dir",
        str(tmp / "cache"),
        "--dtype",
        args.dtype,
        "--log-level",
        "WARNING",
    ]
    if ray:
        cmd += ["--ray", "--ray-num-cpus", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            h = httpx.get(base + "/health", timeout=5).json()
            if h.get("state") == "ready":
                return proc, base
            if h.get("state") == "failed":
                stop(proc)
                raise SystemExit(f"model failed to load: {h}")
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    stop(proc)
    raise SystemExit("server did not become ready in time")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def level(args: argparse.Namespace, base: str, n: int, offset: int) -> dict:
    bodies = [request_body(args, offset + i) for i in range(n)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30)) as client:
        t0 = time.monotonic()
        results = await asyncio.gather(*(one_stream(client, base, b) for b in bodies))
        wall = time.monotonic() - t0
    return summarize(results, n, wall)


def measure(args: argparse.Namespace, base: str) -> dict[str, list[float]]:
    asyncio.run(level(args, base, 1, 999))  # warm-up (first-call allocations)
    out: dict[str, list[float]] = {"tok_s_1": [], "ttft_1": [], "agg_8": []}
    for r in range(args.repeat):
        one = asyncio.run(level(args, base, 1, 100 + r))
        eight = asyncio.run(level(args, base, 8, 200 + 8 * r))
        out["tok_s_1"].append(one["per_stream_tok_s"])
        out["ttft_1"].append(one["ttft_p50_s"])
        out["agg_8"].append(eight["agg_e2e_tok_s"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=[k for k in KINDS if k != "fake"], default="paddleocr-vl")
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--image-px", type=int, default=224)
    p.add_argument("--base-size", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="single,ray")
    p.add_argument("--load-timeout", type=float, default=600)
    add_cpu_class_argument(p)
    args = p.parse_args()
    apply_cpu_class(args)
    args.ckpt = args.ckpt or Path(KINDS[args.model][1])
    import torch

    print(
        f"# CPU class: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs; model {args.model} "
        f"{args.dtype}; {args.max_tokens} tokens, {args.image_px}px image; {args.repeat} rounds"
    )
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        cfg = tmp / "config.toml"
        write_config(cfg, args.model, args.ckpt, 16, 64)
        # cluster mode deploys every configured model: the other built-in ones are scaled to zero
        from deepseek_ocr_server.config import builtin_models

        with cfg.open("a", encoding="utf-8") as f:
            for other in builtin_models():
                if other != args.model:
                    f.write(f"[models.entries.{other}.ray]\nmin_replicas = 0\n")
        for mode in args.modes.split(","):
            t0 = time.monotonic()
            proc, base = start(args, cfg, tmp, ray=mode == "ray")
            print(f"# {mode}: ready in {time.monotonic() - t0:.1f} s", flush=True)
            try:
                results[mode] = measure(args, base)
            finally:
                stop(proc)
            print(f"# {mode}: {results[mode]}", flush=True)
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in results.items()}
    print("| mode | 1 stream tok/s | TTFT 1 stream | 8 streams agg tok/s (e2e) | rounds (tok/s 1) |")
    print("|---|---|---|---|---|")
    for m, r in med.items():
        rounds = ", ".join(f"{x:.1f}" for x in results[m]["tok_s_1"])
        print(f"| {m} | {r['tok_s_1']:.1f} | {r['ttft_1'] * 1000:.0f} ms | {r['agg_8']:.1f} | {rounds} |")
    if "single" in med and "ray" in med:
        s, r = med["single"], med["ray"]
        print(
            f"ray/single: 1-stream tok/s {r['tok_s_1'] / s['tok_s_1']:.3f} (target >= 0.95), "
            f"TTFT {1000 * (r['ttft_1'] - s['ttft_1']):+.0f} ms (target <= +50 ms), "
            f"8-stream aggregate {r['agg_8'] / s['agg_8']:.3f}"
        )


if __name__ == "__main__":
    main()
