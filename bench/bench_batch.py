"""Batch command benchmark: N pages through ``deepseek-ocr`` in-process (every page in the one
continuous-batching engine) against the same N pages sent one by one over HTTP to the real server (what
a user without the batch command would script). Reports pages/minute of both and the ratio (goal >= 3x).

The pages are one N-page PDF made here (text lines and a table drawn on each page, rendered by the shared
document pipeline at --dpi); the HTTP side renders the same pages the same way and posts each as a PNG.
Both sides use the same full-size random checkpoint, dtype, greedy decoding and token budget; the
model load is outside both timings. Each side runs in its own process (and the server in another), one
side per invocation so that each exclusive lock hold stays short; results accumulate in --results and the
ratio is printed once both sides are there (medians of the repeats of each side).

    flock -x /tmp/ocr-heavy.lock env PYTHONPATH=src python bench/bench_batch.py --side inproc
    flock -x /tmp/ocr-heavy.lock env PYTHONPATH=src python bench/bench_batch.py --side http
    PYTHONPATH=src python bench/bench_batch.py --model fake --side both      # harness smoke test

Checkpoints: ``--ckpt DIR`` (default ``/work/cache/<model>-full``, built when missing).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

KINDS = {
    "paddleocr-vl": ("deepseek_ocr_server.testing.paddleocr_vl", "/work/cache/paddleocr-vl-full"),
    "deepseek-ocr": ("deepseek_ocr_server.testing.deepseek_ocr", "/work/cache/deepseek-ocr-full"),
    "fake": ("deepseek_ocr_server.testing.fake", ""),
}


def make_pdf(path: Path, pages: int, width_pt: int, height_pt: int) -> None:
    """A document-like PDF: a title, paragraphs of text lines and a ruled table on every page."""
    from PIL import Image, ImageDraw

    images = []
    for i in range(pages):
        img = Image.new("RGB", (width_pt, height_pt), "white")
        d = ImageDraw.Draw(img)
        d.text((20, 16), f"Report section {i + 1}", fill="black")
        y = 40
        for line in range(12):
            d.text(
                (20, y),
                f"line {line} of page {i + 1}: quarterly revenue grew {3 * line + i}% year on year",
                fill=(20, 20, 20),
            )
            y += 12
        for r in range(5):
            for c in range(4):
                d.rectangle((20 + 60 * c, y + 8 + 16 * r, 80 + 60 * c, y + 24 + 16 * r), outline="black")
                d.text((24 + 60 * c, y + 10 + 16 * r), f"{r * c + i}", fill="black")
        images.append(img)
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72.0)


def write_config(
    path: Path, model: str, ckpt: Path, max_running: int, max_new_tokens: int, dtype: str
) -> None:
    from deepseek_ocr_server.models.base import ModelFiles

    files = ModelFiles.from_dir(ckpt)
    kind = model
    lines = [
        "[models]", f'active = "{model}"', f"[models.entries.{model}]", f'kind = "{kind}"',
        f'config = "{files.config}"', f'tokenizer = "{files.tokenizer}"', f'weights = "{files.weights}"',
        "[inference]", f'dtype = "{dtype}"', f"max_new_tokens = {max_new_tokens}", "no_repeat_ngram_size = 0",
        "base_size = 512", "image_size = 512", "crop_mode = false",
        "[server]", f"max_running = {max_running}", "max_queued = 64", "queue_timeout_s = 3600",
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_inproc(args: argparse.Namespace, cfg: Path, pdf: Path, out: Path) -> dict:
    """One repeat in a fresh process: load, then time the batch run (pages counted, rendered, read,
    post-processed and written)."""
    code = f"""
import asyncio, json, sys, time
from pathlib import Path
from deepseek_ocr_server.config import load_settings
from deepseek_ocr_server.batch.engines import InProcessEngine
from deepseek_ocr_server.batch.inputs import discover
from deepseek_ocr_server.batch.progress import Progress
from deepseek_ocr_server.batch.runner import BatchRun, RunOptions
settings = load_settings({{}}, Path({str(cfg)!r}))
jobs = {args.jobs} or settings.server.max_running + 2
engine = InProcessEngine(settings, settings.active, None, jobs)
async def main():
    t0 = time.perf_counter(); await engine.start(); load = time.perf_counter() - t0
    docs = discover([{str(pdf)!r}], Path({str(out)!r}))
    run = BatchRun(docs, engine, RunOptions(model_id=settings.active, jobs=jobs, dpi={args.dpi}, overwrite=True),
                   Progress(quiet=True))
    t0 = time.perf_counter(); summary = await run.run(); dt = time.perf_counter() - t0
    doc = json.loads((Path({str(out)!r}) / (Path({str(pdf)!r}).stem + ".json")).read_text())
    toks = sum(p["usage"]["completion_tokens"] for p in doc["pages"])
    print(json.dumps({{"seconds": dt, "load_s": load, "pages": summary.pages, "tokens": toks,
                      "failed": summary.failed}}))
asyncio.run(main())
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"in-process run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def start_server(cfg: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "deepseek_ocr_server",
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--cache-dir",
        str(tmp / "cache"),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            h = httpx.get(base + "/health", timeout=2).json()
            if h.get("state") == "ready":
                return proc, base
            if h.get("state") == "failed":
                proc.terminate()
                raise SystemExit(f"model failed to load: {h.get('error')}")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("server did not become ready")


def run_http(args: argparse.Namespace, model: str, base: str, pdf: Path) -> dict:
    """The same pages, rendered the same way, one chat completion at a time."""
    from deepseek_ocr_server.documents import load_pages

    pages = load_pages(pdf.read_bytes(), dpi=args.dpi, max_pages=10**6)
    urls = []
    for p in pages:
        buf = io.BytesIO()
        p.image.save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    tokens = 0
    with httpx.Client(timeout=3600) as client:
        t0 = time.perf_counter()
        for url in urls:
            r = client.post(base + "/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}]}]})  # fmt: skip
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
        dt = time.perf_counter() - t0
    return {"seconds": dt, "pages": len(urls), "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(KINDS), default="paddleocr-vl")
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--side", choices=["inproc", "http", "both"], default="both")
    p.add_argument("--pages", type=int, default=20)
    p.add_argument("--page-size", default="300x400", help="PDF page size in points (rendered at --dpi)")
    p.add_argument("--dpi", type=int, default=144)
    p.add_argument("--max-tokens", type=int, default=512, help="per page (greedy, no n-gram ban)")
    p.add_argument("--max-running", type=int, default=8)
    p.add_argument("--jobs", type=int, default=0, help="in-process pages in flight (0: max-running + 2)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--results", type=Path, default=Path(tempfile.gettempdir()) / "bench_batch_results.json")
    args = p.parse_args()

    import torch

    module, default_dir = KINDS[args.model]
    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    if args.model == "fake":
        from deepseek_ocr_server.testing.fake import write_fake_checkpoint

        args.ckpt = tmp / "fake"
        write_fake_checkpoint(args.ckpt, step_delay=0.01, min_answer=args.max_tokens * 2, answer_span=1)
    args.ckpt = args.ckpt or Path(default_dir)
    if not (args.ckpt / "config.json").is_file():
        print(f"# building the full-size random checkpoint in {args.ckpt}", file=sys.stderr)
        importlib.import_module(module).build_full_checkpoint(args.ckpt)
    cfg = tmp / "config.toml"
    write_config(cfg, args.model, args.ckpt, args.max_running, args.max_tokens, args.dtype)
    w, h = (int(v) for v in args.page_size.split("x"))
    pdf = tmp / "doc.pdf"
    make_pdf(pdf, args.pages, w, h)
    key = json.dumps(
        {k: str(v) for k, v in sorted(vars(args).items()) if k not in ("side", "repeat", "results")}
    )
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    entry = results.setdefault(key, {"inproc": [], "http": []})
    cpu = torch.backends.cpu.get_cpu_capability()
    print(
        f"# CPU capability {cpu}, torch threads {torch.get_num_threads()}, model {args.model} ({args.dtype}), "
        f"{args.pages} pages of {w}x{h} pt at {args.dpi} DPI, {args.max_tokens} tokens/page max, "
        f"max_running {args.max_running}",
        file=sys.stderr,
    )

    if args.side in ("inproc", "both"):
        for _ in range(args.repeat):
            r = run_inproc(args, cfg, pdf, tmp / "out")
            assert not r["failed"], r
            r["ppm"] = r["pages"] / r["seconds"] * 60
            entry["inproc"].append(r)
            print(
                f"in-process batch: {r['pages']} pages in {r['seconds']:.1f} s = {r['ppm']:.1f} pages/min "
                f"({r['tokens']} tokens, {r['tokens'] / r['seconds']:.1f} tok/s; load {r['load_s']:.1f} s)"
            )
    if args.side in ("http", "both"):
        proc, base = start_server(cfg, tmp)
        try:
            for _ in range(args.repeat):
                r = run_http(args, args.model, base, pdf)
                r["ppm"] = r["pages"] / r["seconds"] * 60
                entry["http"].append(r)
                print(
                    f"one by one over HTTP: {r['pages']} pages in {r['seconds']:.1f} s = {r['ppm']:.1f} pages/min "
                    f"({r['tokens']} tokens, {r['tokens'] / r['seconds']:.1f} tok/s)"
                )
        finally:
            proc.terminate()
            proc.wait(30)
    entry["cpu"] = cpu
    args.results.write_text(json.dumps(results, indent=1))
    if entry["inproc"] and entry["http"]:
        a = statistics.median(r["ppm"] for r in entry["inproc"])
        b = statistics.median(r["ppm"] for r in entry["http"])
        print(
            f"RESULT ({cpu}): in-process {a:.1f} pages/min vs one-by-one HTTP {b:.1f} pages/min = {a / b:.2f}x "
            f"(goal >= 3x; medians of {len(entry['inproc'])} / {len(entry['http'])} runs)"
        )


if __name__ == "__main__":
    main()
