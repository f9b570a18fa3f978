"""Document benchmark: a 10-page PDF as ONE request vs the same pages as 10 sequential single-image
requests, through the real server (``python -m deepseek_ocr_server``, default engine settings) with a
full-size random checkpoint.

Reports, per mode (medians over ``--repeat`` rounds, the two modes alternating inside each round):
wall time, pages/minute, and the time to the first page's first token (the first SSE chunk, which the
server sends once the first token exists); the ratios document vs sequential; whether the document's
pages equal the single-image answers (random weights: bf16 batched decode may flip near-ties); the CPU
class (``torch.backends.cpu.get_cpu_capability()``).

    flock -x /tmp/ocr-heavy.lock env PYTHONPATH=src python bench/bench_documents.py --model paddleocr-vl

Goal (issue 11): document >= 3x faster than sequential; first page's first token no later than a single
image's. Random weights rarely emit EOS, so every page generates ``--max-tokens`` tokens (default 512,
the server's default budget).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench  # noqa: E402 - the server start-up and config helpers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def make_pdf(pages: int, size_pt: tuple[int, int]) -> bytes:
    from PIL import Image, ImageDraw

    imgs = []
    for i in range(pages):
        img = Image.new("RGB", size_pt, (255, 255, 255))
        d = ImageDraw.Draw(img)
        d.text((12, 10), f"Report page {i + 1}", fill=(0, 0, 0))
        for line in range(2, size_pt[1] // 14):
            d.text(
                (12, 10 + 14 * line), f"{line:02d} lorem ipsum dolor sit amet {i * 31 + line}", fill=(0, 0, 0)
            )
        imgs.append(img)
    buf = io.BytesIO()
    imgs[0].save(buf, "PDF", save_all=True, append_images=imgs[1:], resolution=72.0)
    return buf.getvalue()


def chat_stream(base: str, content: list[dict], args: argparse.Namespace) -> tuple[float, float, str]:
    """(seconds to the first SSE chunk, seconds to the end, text)."""
    body = {
        "model": args.model,
        "stream": True,
        "max_tokens": args.max_tokens,
        "output_format": "raw",
        "messages": [{"role": "user", "content": content}],
    }
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter() - t0
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"server error: {chunk['error']}")
            for c in chunk.get("choices", []):
                parts.append(c["delta"].get("content") or "")
    return first or float("nan"), time.perf_counter() - t0, "".join(parts)


def run_round(
    base: str, pdf: bytes, page_urls: list[str], args: argparse.Namespace, order: list[str]
) -> dict:
    out: dict = {}
    for mode in order:
        if mode == "document":
            url = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
            ttft, wall, text = chat_stream(
                base, [{"type": "file", "file": {"filename": "r.pdf", "file_data": url}}], args
            )
            out["document"] = {"ttft": ttft, "wall": wall, "text": text}
            print(f"# document: first token {ttft:.2f} s, done {wall:.1f} s", file=sys.stderr, flush=True)
        else:
            t0 = time.perf_counter()
            ttfts, texts = [], []
            for url in page_urls:
                ttft, _, text = chat_stream(base, [{"type": "image_url", "image_url": {"url": url}}], args)
                ttfts.append(ttft)
                texts.append(text)
                print(
                    f"# single image {len(texts)}: first token {ttft:.2f} s, done {time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            out["sequential"] = {"ttft": ttfts[0], "wall": time.perf_counter() - t0, "texts": texts}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=["paddleocr-vl", "deepseek-ocr", "fake"],
        default="paddleocr-vl",
        help="fake: a harness smoke test (the fake model sleeps 10 ms per step)",
    )
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--pages", type=int, default=10)
    p.add_argument(
        "--page-pt",
        type=lambda s: tuple(int(x) for x in s.split("x")),
        default=(288, 360),
        help="page size in points (rendered at 144 DPI: twice that in pixels)",
    )
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load-timeout", type=float, default=900)
    args = p.parse_args()
    module, default_dir = serve_bench.KINDS[args.model]
    if args.model == "fake":
        from deepseek_ocr_server.testing.fake import write_fake_checkpoint

        args.ckpt = Path(tempfile.mkdtemp(prefix="fake_ckpt_"))
        write_fake_checkpoint(
            args.ckpt,
            step_delay=0.01,
            min_answer=args.max_tokens * 2,
            answer_span=1,
            max_context=args.max_tokens * 4 + 512,
        )
    args.ckpt = args.ckpt or Path(default_dir)
    if not (args.ckpt / "config.json").is_file():
        print(f"# building the full-size random checkpoint in {args.ckpt}", file=sys.stderr)
        importlib.import_module(module).build_full_checkpoint(args.ckpt)
    # the engine's defaults (max_running 8, max_queued 32, prefill_slice 0.25)
    args.max_running, args.max_queued, args.prefill_slice = 8, 32, None

    import torch

    from deepseek_ocr_server.documents import load_pages

    pdf = make_pdf(args.pages, args.page_pt)
    pages = load_pages(pdf)
    page_urls = []
    for page in pages:
        buf = io.BytesIO()
        page.image.save(buf, "PNG")
        page_urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())

    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a timeout still stops the server (finally)
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = serve_bench.start_server(args, Path(tmp), None)
        try:
            chat_stream(
                base,
                [{"type": "image_url", "image_url": {"url": page_urls[0]}}],
                argparse.Namespace(**{**vars(args), "max_tokens": 2}),
            )  # warm-up
            rounds = [
                run_round(
                    base,
                    pdf,
                    page_urls,
                    args,
                    ["sequential", "document"] if i % 2 == 0 else ["document", "sequential"],
                )
                for i in range(args.repeat)
            ]
            rss = serve_bench.peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[mode][key] for r in rounds)

    from deepseek_ocr_server.documents import page_marker

    same = 0
    for r in rounds:
        doc_text = r["document"]["text"]
        for i, t in enumerate(r["sequential"]["texts"]):
            same += f"{page_marker(i + 1)}\n\n{t}" in doc_text
    n = args.pages
    seq_wall, doc_wall = med("sequential", "wall"), med("document", "wall")
    seq_ttft, doc_ttft = med("sequential", "ttft"), med("document", "ttft")
    print(
        f"# CPU capability: {torch.backends.cpu.get_cpu_capability()}, threads {args.threads}, dtype {args.dtype}"
    )
    print(
        f"# {args.model}, {n} pages of {pages[0].image.width}x{pages[0].image.height} px (144 DPI), "
        f"max_tokens {args.max_tokens}, {args.repeat} round(s), medians; server peak RSS {rss:.0f} MiB"
    )
    print("| mode | wall s | pages/min | first page's first token s |")
    print("|---|---|---|---|")
    print(
        f"| 10 sequential single-image requests | {seq_wall:.1f} | {60 * n / seq_wall:.2f} | {seq_ttft:.2f} |"
    )
    print(f"| one {n}-page PDF request | {doc_wall:.1f} | {60 * n / doc_wall:.2f} | {doc_ttft:.2f} |")
    print(
        f"document vs sequential: {seq_wall / doc_wall:.2f}x faster (goal >= 3x); first token "
        f"{doc_ttft / seq_ttft:.2f}x the single image's (goal <= 1)"
    )
    print(f"pages identical to their single-image answers: {same} of {n * len(rounds)}")


if __name__ == "__main__":
    main()
