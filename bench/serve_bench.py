"""Serving benchmark: the real server (``python -m deepseek_ocr_server``) with full-size random checkpoints,
driven by N concurrent streaming clients (OpenAI chat completions over SSE).

For each N it reports aggregate decode tokens/s (steady state: all N streams decoding), per-stream decode
tokens/s, end-to-end aggregate tokens/s (prefills included), time to first token p50/p95, and the server's
peak RSS; plus the machine's measured read bandwidth and the decode bound it implies
(bytes of decoder weights read per token / bandwidth). Ratios printed against the targets:
aggregate at 8 streams >= 4x one stream; one stream >= 60% of the bound (bf16).

    flock /work/heavy.lock env PYTHONPATH=src python bench/serve_bench.py --model paddleocr-vl
    flock /work/heavy.lock env PYTHONPATH=src python bench/serve_bench.py --model deepseek-ocr --quantize int8

Checkpoints: ``--ckpt DIR`` (default ``/work/cache/<model>-full``; built with the random full-size builder
of ``deepseek_ocr_server.testing.<kind>`` when missing).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import io
import json
import math
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from probe import add_cpu_class_argument, apply_cpu_class, measure_bandwidth_gbs

REPO = Path(__file__).resolve().parents[1]

KINDS = {
    "deepseek-ocr": ("deepseek_ocr_server.testing.deepseek_ocr", "/work/cache/deepseek-ocr-full"),
    "paddleocr-vl": ("deepseek_ocr_server.testing.paddleocr_vl", "/work/cache/paddleocr-vl-full"),
    "glm-ocr": ("deepseek_ocr_server.testing.glm_ocr", "/work/cache/glm-ocr-full"),
    "fake": ("deepseek_ocr_server.testing.fake", ""),  # harness smoke test (--in-process)
}
# prefixes of tensors that are not read per decoded token (vision side; embeddings read one row)
NOT_DECODE = ("model.sam_model.", "model.vision_model.", "model.projector.", "model.image_newline",
              "model.view_seperator", "visual.", "mlp_AR.", "model.embed_tokens.",
              # GLM-OCR: vision tower, embeddings, and the multi-token-prediction layer (not loaded)
              "model.visual.", "model.language_model.embed_tokens.", "model.language_model.layers.16.")


# --- the bound -----------------------------------------------------------------------------------
def _safetensors_headers(ckpt: Path) -> dict[str, dict]:
    index = sorted(ckpt.glob("*.safetensors.index.json"))
    files = sorted({ckpt / f for f in json.loads(index[0].read_text())["weight_map"].values()}) if index else sorted(
        ckpt.glob("*.safetensors"))
    out: dict[str, dict] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            out.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    return out


def decode_params_per_token(ckpt: Path, streams: int = 1) -> float:
    """Decoder parameters read per generated token in a decode step of ``streams`` sequences.

    Dense weights are read once per step and shared by the rows. A MoE layer reads every routed expert
    that SOME row selected: with independent, uniform routing (what a load-balanced router aims at, and
    what these random checkpoints do) an expert escapes all N rows with probability (1 - k/E)^N, so a
    step reads E * (1 - (1 - k/E)^N) experts per layer (8 rows of DeepSeek-OCR's top-6 of 64: ~35).
    """
    cfg = json.loads((ckpt / "config.json").read_text())
    lc = cfg.get("language_config", cfg)
    experts_frac = 1.0
    if lc.get("n_routed_experts"):
        experts_frac = 1.0 - (1.0 - lc["num_experts_per_tok"] / lc["n_routed_experts"]) ** streams
    total = 0.0
    for name, meta in _safetensors_headers(ckpt).items():
        if name.startswith(NOT_DECODE):
            continue
        n = math.prod(meta["shape"])
        total += n * (experts_frac if ".mlp.experts." in name else 1.0)
    return total / streams


# --- server --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(
    path: Path, model: str, ckpt: Path, max_running: int, max_queued: int, prefill_slice: float | None = None
) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from deepseek_ocr_server.models.base import ModelFiles

    weights = [ModelFiles.from_dir(ckpt).weights]
    path.write_text(
        "[models]\n"
        f'active = "{model}"\n'
        f"[models.entries.{model}]\n"
        f'kind = "{model}"\n'
        f'config = "{ckpt / "config.json"}"\n'
        f'tokenizer = "{ckpt / "tokenizer.json"}"\n'
        f'weights = "{weights[0]}"\n'
        "[server]\n"
        f"max_running = {max_running}\n"
        f"max_queued = {max_queued}\n"
        "queue_timeout_s = 3600\n"
        + (f"prefill_slice_s = {prefill_slice}\n" if prefill_slice is not None else ""),
        encoding="utf-8",
    )


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args: argparse.Namespace, tmp: Path, quantize: str | None) -> tuple[subprocess.Popen, str]:
    cfg = tmp / "config.toml"
    write_config(cfg, args.model, args.ckpt, args.max_running, args.max_queued, args.prefill_slice)
    port = free_port()
    cmd = [sys.executable, "-m", "deepseek_ocr_server", "--config", str(cfg), "--model", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(tmp / "cache"),
           "--dtype", args.dtype, "--log-level", "WARNING"]
    if quantize:
        cmd += ["--quantize", quantize]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            h = httpx.get(base + "/health", timeout=2).json()
            if h.get("state") == "ready":
                print(f"# server ready (load {h.get('load_seconds', 0):.1f} s)", file=sys.stderr)
                return proc, base
            if h.get("state") == "failed":
                proc.terminate()
                raise SystemExit(f"model failed to load: {h.get('error')}")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("server did not become ready in time")


# --- clients -------------------------------------------------------------------------------------
def image_data_url(i: int, size: int) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255 - 20 * (i % 8), 255, 255))
    d = ImageDraw.Draw(img)
    for y in range(10, size - 10, 24):
        d.text((10, y), f"line {y} of page {i}: the quick brown fox", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class StreamResult:
    t_send: float
    t_first: float | None = None
    t_end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None


async def one_stream(client: httpx.AsyncClient, base: str, body: dict) -> StreamResult:
    r = StreamResult(time.monotonic())
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            now = time.monotonic()
            if r.t_first is None:  # the role chunk: the server sends it when the first token exists
                r.t_first = now
            if ev.get("usage"):
                r.completion_tokens = ev["usage"]["completion_tokens"]
            for ch in ev.get("choices", []):
                if ch.get("delta", {}).get("content"):
                    r.chunk_times.append(now)
                if ch.get("finish_reason"):
                    r.finish_reason = ch["finish_reason"]
    r.t_end = time.monotonic()
    return r


def request_body(args: argparse.Namespace, i: int) -> dict:
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(i, args.image_px)}},
            {"type": "text", "text": "Free OCR." if args.model == "deepseek-ocr" else "OCR:"},
        ]}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.model == "deepseek-ocr":
        body.update(base_size=args.base_size, image_size=args.base_size, crop_mode=False)
    return body


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(sample name, batch label or ''): value} for the engine counters the bench reads."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.startswith(("ocr_decode_", "ocr_prefill_seconds", "ocr_time_to_first_token")):
                out[(smp.name, smp.labels.get("batch", smp.labels.get("le", "")))] = smp.value
    return out


def longest_gap(before: dict, after: dict) -> float:
    """Upper bound of the longest wait between two decode steps during the run, from the engine's
    ``ocr_decode_step_gap_seconds`` histogram: the smallest bucket holding every gap observed."""
    name = "ocr_decode_step_gap_seconds_bucket"
    total = after.get(("ocr_decode_step_gap_seconds_count", ""), 0.0) - before.get(
        ("ocr_decode_step_gap_seconds_count", ""), 0.0)
    if total <= 0:
        return float("nan")
    for le in sorted((k[1] for k in after if k[0] == name), key=float):
        if after[(name, le)] - before.get((name, le), 0.0) >= total:
            return float(le)
    return float("nan")


def engine_rates(before: dict, after: dict, n: int) -> dict:
    """Decode throughput from the engine's own counters (token-exact, independent of text):
    at batch size n (all n streams decoding), and over every step of the level."""

    def delta(name: str, batch: str) -> float:
        return after.get((name, batch), 0.0) - before.get((name, batch), 0.0)

    batches = {b for (name, b) in after if name == "ocr_decode_steps_total"}
    steps = {b: delta("ocr_decode_steps_total", b) for b in batches}
    secs = {b: delta("ocr_decode_seconds_total", b) for b in batches}
    full = str(n)
    tokens = sum(int(b) * k for b, k in steps.items())
    total_s = sum(secs.values())
    return {
        "decode_tok_s_at_n": n * steps[full] / secs[full] if steps.get(full) and secs.get(full) else float("nan"),
        "stream_tok_s_at_n": steps[full] / secs[full] if steps.get(full) and secs.get(full) else float("nan"),
        "decode_tok_s_all_steps": tokens / total_s if total_s else float("nan"),
        "prefill_s_mean": (delta("ocr_prefill_seconds_sum", "") / delta("ocr_prefill_seconds_count", ""))
        if delta("ocr_prefill_seconds_count", "") else float("nan"),
        "steps_at_n": steps.get(full, 0.0),
        "max_gap_s": longest_gap(before, after),
    }


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


async def run_level(args: argparse.Namespace, base: str, n: int) -> dict:
    bodies = [request_body(args, i) for i in range(n)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30)) as client:
        before = parse_metrics((await client.get(base + "/metrics")).text)
        t0 = time.monotonic()
        results = await asyncio.gather(*(one_stream(client, base, b) for b in bodies))
        wall = time.monotonic() - t0
        after = parse_metrics((await client.get(base + "/metrics")).text)
    return {**summarize(results, n, wall), **engine_rates(before, after, n)}


def summarize(results: list[StreamResult], n: int, wall: float) -> dict:
    toks = [r.completion_tokens or len(r.chunk_times) for r in results]
    per_stream = [
        (t - 1) / (r.t_end - r.t_first) for r, t in zip(results, toks, strict=True)
        if r.t_first is not None and t > 1 and r.t_end > r.t_first
    ]
    # steady state: every stream has started and none has finished
    lo = max(r.t_first or r.t_end for r in results)
    hi = min(r.chunk_times[-1] if r.chunk_times else r.t_end for r in results)
    in_window = sum(sum(1 for t in r.chunk_times if lo < t <= hi) for r in results)
    steady = in_window / (hi - lo) if hi > lo and in_window >= 4 * n else float("nan")
    ttft = [(r.t_first or r.t_end) - r.t_send for r in results]
    return {
        "clients": n,
        "tokens": sum(toks),
        "finish": sorted({r.finish_reason or "?" for r in results}),
        "agg_steady_tok_s": steady,
        "agg_e2e_tok_s": sum(toks) / wall,
        "per_stream_tok_s": statistics.median(per_stream) if per_stream else float("nan"),
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "wall_s": wall,
    }


# --- in-process mode (engine only, no HTTP): ModelManager.submit with the same requests ----------------
def load_in_process(args: argparse.Namespace, quantize: str | None):
    import torch

    from deepseek_ocr_server.models import load_model
    from deepseek_ocr_server.models.base import ModelFiles

    torch.set_num_threads(args.threads)
    dtype = {"auto": None, "bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    return load_model(args.model, ModelFiles.from_dir(args.ckpt), dtype=dtype, quantize=quantize)


async def run_level_in_process(args: argparse.Namespace, manager, n: int) -> dict:
    from PIL import Image

    from deepseek_ocr_server.engine.types import Finished, OcrRequest, TextDelta
    def make(i: int) -> OcrRequest:
        url = image_data_url(i, args.image_px)
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        text = "<image>\nFree OCR." if args.model == "deepseek-ocr" else "OCR:"
        vis = {"base_size": args.base_size, "image_size": args.base_size, "crop_mode": False}
        return OcrRequest(model_id=args.model, text=text, images=[img], options=vis, max_new_tokens=args.max_tokens)

    async def one(r: OcrRequest) -> StreamResult:
        res = StreamResult(time.monotonic())
        async for ev in manager.submit(r):
            now = time.monotonic()
            if isinstance(ev, TextDelta):
                if res.t_first is None:
                    res.t_first = now
                if ev.text:
                    res.chunk_times.append(now)
            elif isinstance(ev, Finished):
                res.completion_tokens, res.finish_reason = ev.completion_tokens, ev.finish_reason
        res.t_end = time.monotonic()
        return res

    from prometheus_client import generate_latest

    reqs = [make(i) for i in range(n)]
    before = parse_metrics(generate_latest().decode())
    t0 = time.monotonic()
    results = await asyncio.gather(*(one(r) for r in reqs))
    wall = time.monotonic() - t0
    after = parse_metrics(generate_latest().decode())
    return {**summarize(results, n, wall), **engine_rates(before, after, n)}


def bench_in_process(args: argparse.Namespace, quantize: str | None) -> list[dict]:
    from deepseek_ocr_server.engine.manager import ModelManager

    async def main() -> list[dict]:
        mgr = ModelManager([args.model], lambda _id: load_in_process(args, quantize),
                           max_running=args.max_running, max_queued=args.max_queued, queue_timeout_s=3600)
        await run_level_in_process(args, mgr, 1)  # load + warm-up
        print(f"# model loaded in {mgr.status().load_seconds:.1f} s", file=sys.stderr)
        rows = []
        for n in args.clients:
            row = await run_level_in_process(args, mgr, n)
            row["peak_rss_mib"] = peak_rss_mib(os.getpid())
            row["quantize"] = quantize or "none"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        await mgr.shutdown()
        return rows

    return asyncio.run(main())


def int8_check(args: argparse.Namespace, bound: dict, steps: int = 64) -> None:
    """Quality and speed of int8 vs the model dtype, in-process on ONE model copy (quantized in place):
    greedy tokens free-running and teacher-forced over ``steps`` steps; decode tok/s at batch 1 and 8."""
    import torch
    from PIL import Image

    from deepseek_ocr_server.engine.generate import generate
    from deepseek_ocr_server.models import load_model
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
    from deepseek_ocr_server.models.quant import int8_weight_bytes, quantize_linears_int8
    from deepseek_ocr_server.models.registry import family
    from deepseek_ocr_server.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    dtype = {"auto": None, "bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    model = load_model(args.model, ModelFiles.from_dir(args.ckpt), dtype=dtype)
    url = image_data_url(0, args.image_px)
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    text = "<image>\nFree OCR." if args.model == "deepseek-ocr" else "OCR:"
    vis = VisionSettings(base_size=args.base_size, image_size=args.base_size, crop_mode=False)
    prepared = model.prepare(text, [img], vis)
    greedy = SamplingParams(no_repeat_ngram_size=0)

    def decode_rate(batch: int) -> float:
        _, cache = model.prefill(prepared, steps + 2)
        caches = [cache]
        for _ in range(batch - 1):
            caches.append(model.prefill(prepared, steps + 2)[1])
        # a different token per row: rows of a MoE route differently, as different streams do
        tok = [ref[i % len(ref)] for i in range(batch)]
        model.decode(tok, caches)  # warm-up
        t0 = time.perf_counter()
        n = 16
        for _ in range(n):
            model.decode(tok, caches)
        dt = time.perf_counter() - t0
        for c in caches:
            c.release()
        return n * batch / dt

    def forced(tokens: list[int]) -> float:
        logits, cache = model.prefill(prepared, len(tokens) + 1)
        same = 0
        for t in tokens:
            same += int(torch.argmax(logits).item() == t)
            logits = model.decode([t], [cache])[0]
        cache.release()
        return same / len(tokens)

    with torch.inference_mode():
        ref = generate(model, prepared, greedy, steps).token_ids
        base_rates = {b: decode_rate(b) for b in (1, 8)}
        n = quantize_linears_int8(model.net, skip=lambda name, _: family(args.model).is_vision(name))
        label = "int8"
        q = generate(model, prepared, greedy, steps).token_ids
        q_rates = {b: decode_rate(b) for b in (1, 8)}
        agree_forced = forced(ref)
    prefix = next((i for i, (a, b) in enumerate(zip(ref, q, strict=False)) if a != b), min(len(ref), len(q)))
    same_pos = sum(a == b for a, b in zip(ref, q, strict=False)) / max(1, len(ref))
    print(f"\n## {label} check: {args.model}, {n} linear layers converted ({int8_weight_bytes(model.net) / 1e9:.2f} GB int8)")
    print(f"greedy {len(ref)} steps: identical positions {same_pos:.0%}, identical prefix {prefix} tokens, "
          f"teacher-forced agreement {agree_forced:.0%} (target >= 90%)")
    for b in (1, 8):
        print(f"decode batch {b}: {args.dtype} {base_rates[b]:.2f} tok/s -> {label} {q_rates[b]:.2f} tok/s "
              f"({q_rates[b] / base_rates[b]:.2f}x)")
    bound1 = bound["bandwidth_gbs"] * 1e9 / bound["params"]
    print(f"bounds at {bound['bandwidth_gbs']:.1f} GB/s: {args.dtype} {bound1 / 2:.1f} tok/s, int8 {bound1:.1f} tok/s; "
          f"batch-1 decode at {base_rates[1] / (bound1 / 2):.0%} / {q_rates[1] / bound1:.0%} of them")


def median_row(rows: list[dict]) -> dict:
    """The run with the median decode rate at its level (all its numbers from that one run)."""
    rows = sorted(rows, key=lambda r: r["decode_tok_s_at_n"] if r["decode_tok_s_at_n"] == r["decode_tok_s_at_n"] else 0)
    row = dict(rows[len(rows) // 2])
    row["runs"] = len(rows)
    row["decode_tok_s_range"] = [rows[0]["decode_tok_s_at_n"], rows[-1]["decode_tok_s_at_n"]]
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rows)
    return row


def bench_one(args: argparse.Namespace, quantize: str | None, bound: dict) -> list[dict]:
    if args.in_process:
        return bench_in_process(args, quantize)
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmpd:
        proc, base = start_server(args, Path(tmpd), quantize)
        try:
            asyncio.run(run_level(args, base, 1))  # warm-up
            runs: dict[int, list[dict]] = {n: [] for n in args.clients}
            # levels interleaved, --repeat rounds: a drift of this shared VM hits every level alike
            for _ in range(args.repeat):
                for n in args.clients:
                    # this VM's read bandwidth drifts with its neighbours (40-70 GB/s within minutes):
                    # each run is judged against a probe taken right before it
                    bw = measure_bandwidth_gbs(args.threads) if args.model != "fake" else bound["bandwidth_gbs"]
                    row = asyncio.run(run_level(args, base, n))
                    row["bandwidth_gbs"] = bw
                    row["peak_rss_mib"] = peak_rss_mib(proc.pid)
                    row["quantize"] = quantize or "none"
                    runs[n].append(row)
                    print(json.dumps(row), file=sys.stderr)
            return [median_row(runs[n]) for n in args.clients]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def report(args: argparse.Namespace, rows: list[dict], bound: dict) -> None:
    q = rows[0]["quantize"]
    bytes_per_param = {"none": {"auto": 2, "bf16": 2, "f16": 2, "f32": 4}[args.dtype], "int8": 1}[q]
    bound_tok_s = bound["bandwidth_gbs"] * 1e9 / (bound["params"] * bytes_per_param)
    mode = "in-process engine" if args.in_process else "HTTP server"
    print(f"\n## {args.model} ({mode})  dtype={args.dtype} quantize={q}  max_tokens={args.max_tokens}  "
          f"image={args.image_px}px  threads={args.threads}")
    print(f"decoder weights read per token: {bound['params'] / 1e6:.0f} M params = "
          f"{bound['params'] * bytes_per_param / 1e9:.2f} GB; read bandwidth {bound['bandwidth_gbs']:.1f} GB/s "
          f"-> bound {bound_tok_s:.1f} tok/s")
    def bound_at(n: int) -> float:
        """tok/s if a step of n rows read its weights at the measured bandwidth (the bytes a step of n
        rows reads: an estimate from the checkpoint, uniform expert routing)."""
        return by_n.get(n, {}).get("bandwidth_gbs", bound["bandwidth_gbs"]) * 1e9 * n / step_bytes(n)

    by_n = {r["clients"]: r for r in rows}

    def step_bytes(n: int) -> float:  # weight bytes a step of n rows reads (estimated)
        return bound["params_at"].get(n, bound["params"]) * bytes_per_param * n

    print("| clients | decode tok/s, all N in batch | range over runs | GB read per step | GB/s probe | bound at N | of bound | per-stream tok/s at N "
          "| per-stream tok/s e2e | agg tok/s e2e | TTFT p50 s | TTFT p95 s | longest step gap s (<=) | prefill s (mean) | peak RSS MiB "
          "| finish |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = bound_at(r["clients"])
        gb = step_bytes(r["clients"]) / 1e9
        lo, hi = r.get("decode_tok_s_range", [r["decode_tok_s_at_n"]] * 2)
        print(f"| {r['clients']} | {r['decode_tok_s_at_n']:.2f} | {lo:.1f}-{hi:.1f} | {gb:.2f} | "
              f"{r.get('bandwidth_gbs', bound['bandwidth_gbs']):.1f} | {b:.1f} | {r['decode_tok_s_at_n'] / b:.0%} | "
              f"{r['stream_tok_s_at_n']:.2f} | "
              f"{r['per_stream_tok_s']:.2f} | {r['agg_e2e_tok_s']:.2f} | {r['ttft_p50_s']:.2f} | "
              f"{r['ttft_p95_s']:.2f} | {r.get('max_gap_s', float('nan')):.2f} | {r['prefill_s_mean']:.2f} | {r['peak_rss_mib']:.0f} | {','.join(r['finish'])} |")
    print("(decode columns: the engine's own step timings for steps where all N streams were in the batch; "
          "GB read per step: weights a step at N reads, estimated from the checkpoint (MoE: uniform routing; "
          "testing.probes.decode_weight_bytes counts them exactly in-process); GB/s probe: read bandwidth measured right before that run; bound at N: N tokens per "
          "such read at that bandwidth; e2e columns: client side, prefills of the other streams included)")
    if 1 in by_n:
        single = by_n[1]["stream_tok_s_at_n"]
        print(f"single stream vs bound: {single:.2f} / {bound_at(1):.1f} = {single / bound_at(1):.0%} "
              f"(target >= 60% in bf16)")
        for n in (8, 16):
            if n in by_n:
                agg = by_n[n]["decode_tok_s_at_n"]
                print(f"aggregate decode at {n} vs 1: {agg:.2f} / {single:.2f} = {agg / single:.2f}x"
                      + (" (target >= 4x)" if n == 8 else "")
                      + f"; at equal bandwidth the bytes read allow {n * step_bytes(1) / step_bytes(n):.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(KINDS), default="paddleocr-vl")
    p.add_argument("--ckpt", type=Path, help="checkpoint dir (default /work/cache/<model>-full)")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over all levels (interleaved); each level reports its median run")
    p.add_argument("--image-px", type=int, default=224, help="side of the square test image")
    p.add_argument("--base-size", type=int, default=512, help="DeepSeek-OCR base_size (crop_mode off)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f16", "f32"],
                   help="auto: per phase by the CPU class (decode weights bf16 on every class)")
    add_cpu_class_argument(p)
    p.add_argument("--quantize", default="none", choices=["none", "int8", "both"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--max-queued", type=int, default=64)
    p.add_argument("--prefill-slice", type=float, help="the server's prefill_slice_s (default: its own)")
    p.add_argument("--load-timeout", type=float, default=900)
    p.add_argument("--json", type=Path, help="also write all rows here")
    p.add_argument("--int8-check", action="store_true",
                   help="only compare int8 with --dtype in-process: greedy agreement over 64 steps, decode speed")
    p.add_argument("--in-process", action="store_true",
                   help="drive the engine's ModelManager directly (no HTTP server; TTFT without HTTP/SSE)")
    args = p.parse_args()
    apply_cpu_class(args)
    module, default_dir = KINDS[args.model]
    if args.model == "fake":
        from deepseek_ocr_server.testing.fake import write_fake_checkpoint

        args.ckpt = Path(tempfile.mkdtemp(prefix="fake_ckpt_"))
        write_fake_checkpoint(args.ckpt, step_delay=0.01, min_answer=args.max_tokens * 2, answer_span=1)
    args.ckpt = args.ckpt or Path(default_dir)
    if not (args.ckpt / "config.json").is_file():
        print(f"# building the full-size random checkpoint in {args.ckpt}", file=sys.stderr)
        sys.path.insert(0, str(REPO / "src"))
        importlib.import_module(module).build_full_checkpoint(args.ckpt)
    if args.model == "fake":
        bound = {"params": 1e9, "bandwidth_gbs": 1.0, "params_at": {}}  # meaningless: the fake sleeps 10 ms per step
    else:
        bound = {
            "params": decode_params_per_token(args.ckpt),
            "params_at": {n: decode_params_per_token(args.ckpt, n) for n in args.clients},
            "bandwidth_gbs": measure_bandwidth_gbs(args.threads),
        }
    if args.int8_check:
        int8_check(args, bound)
        return
    modes = {"none": [None], "int8": ["int8"], "both": [None, "int8"]}[args.quantize]
    all_rows = []
    for q in modes:
        rows = bench_one(args, q, bound)
        report(args, rows, bound)
        all_rows += rows
    if args.quantize == "both":
        base1 = next(r for r in all_rows if r["quantize"] == "none" and r["clients"] == 1)
        q1 = next(r for r in all_rows if r["quantize"] == "int8" and r["clients"] == 1)
        print(f"int8 vs bf16 single-stream decode: {q1['stream_tok_s_at_n'] / base1['stream_tok_s_at_n']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"bound": bound, "rows": all_rows}, indent=2))


if __name__ == "__main__":
    main()
