"""Benchmark DeepSeek-OCR at FULL size on random weights (not a test).

Builds a full-size random checkpoint once (official sizes, all 2,710 original keys, BF16, one
6.7 GB file; default cache /work/cache/deepseek-ocr-full), then, for a ~1000x1400 document-like
image at batch 1 (Gundam: 1024 global + 2x3 tiles of 640 = 903 image tokens), reports
preprocessing, vision, prefill, decode tokens/s and peak RSS for each dtype, each dtype in its own
process (so peak RSS is per dtype). Prints the weight-bandwidth decode bound: measured DRAM read
bandwidth / bytes of weights read per token (PERF-NOTES: 574 M params per token).

Run heavy things under the lock:  flock /work/heavy.lock python bench/bench_deepseek_ocr.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from probe import add_cpu_class_argument, apply_cpu_class, measure_bandwidth_gbs

DTYPES = {"auto": None, "bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}
# approximate peak RSS needs (GiB) to decide whether a dtype can run here
NEEDS_GIB = {"auto": 9.0, "bf16": 8.0, "f32": 14.5, "f16": 8.0}


def ensure_checkpoint(cache: Path) -> Path:
    from deepseek_ocr_server.testing.deepseek_ocr import build_full_checkpoint

    done = cache / ".complete"
    if not done.exists():
        print(f"building full-size random checkpoint in {cache} (once) ...", flush=True)
        t = time.perf_counter()
        build_full_checkpoint(cache)
        done.write_text("ok")
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    return cache


def params_per_token(cfg) -> int:
    """Weights read for one decode token (attention, dense layer, routed top-k + shared + router, lm_head)."""
    lm = cfg.language
    h = lm.hidden_size
    n = 4 * h * h * lm.num_hidden_layers
    for i in range(lm.num_hidden_layers):
        if lm.is_moe_layer(i):
            n += lm.num_experts_per_tok * 3 * h * lm.moe_intermediate_size
            n += 3 * h * lm.moe_intermediate_size * lm.n_shared_experts + lm.n_routed_experts * h
        else:
            n += 3 * h * lm.intermediate_size
    return n + lm.vocab_size * h


def document_image(w: int = 1000, h: int = 1400):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (252, 252, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((60, 50, w - 60, 110), fill=(30, 30, 30))
    y = 150
    k = 0
    while y < h - 80:
        words = 6 + (k * 7) % 5
        x = 60
        for j in range(words):
            ww = 40 + ((k * 13 + j * 29) % 90)
            if x + ww > w - 60:
                break
            d.text((x, y), "lorem ipsum dolor"[: 3 + (j % 12)], fill=(20, 20, 20))
            x += ww + 12
        y += 26
        k += 1
        if k % 12 == 0:
            d.rectangle((60, y, w // 2, y + 120), outline=(0, 0, 0), width=2)
            y += 140
    return img


def child(args: argparse.Namespace) -> None:
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrModel
    from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
    from deepseek_ocr_server.testing.probes import timed_prefill

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    t = time.perf_counter()
    model = DeepseekOcrModel.load(ModelFiles.from_dir(args.cache_dir), dtype=dtype)
    load_s = time.perf_counter() - t
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    img = document_image()
    t = time.perf_counter()
    prep = model.prepare("<image>\n<|grounding|>Convert the document to markdown.", [img], VisionSettings())
    pre_s = time.perf_counter() - t
    timed = timed_prefill(model, prep, args.decode_tokens + 1)
    logits, cache, vision_s, prefill_s = timed.logits, timed.cache, timed.vision_s, timed.prefill_s
    tok = int(torch.argmax(logits))
    steps = []
    for _ in range(args.decode_tokens):
        t = time.perf_counter()
        logits = model.decode([tok], [cache])[0]
        tok = int(torch.argmax(logits))
        steps.append(time.perf_counter() - t)
    batch = {}
    for b in args.batch:
        if b <= 1:
            continue
        # batched decode over b copies of the prompt's cache (prefilled once, copied)
        caches = [_clone_cache(cache, args.decode_tokens + 16) for _ in range(b)]
        times = []
        toks = [tok] * b
        for _ in range(8):
            t = time.perf_counter()
            model.decode(toks, caches)
            times.append(time.perf_counter() - t)
        batch[b] = b / statistics.median(times[2:])
    out = {
        "dtype": args.dtype,
        "precision": model.precision.summary(),
        "weight_bytes_per_param": model.precision.weights_dtype.itemsize,
        "load_s": load_s,
        "rss_after_load_gib": rss_after_load,
        "prompt_tokens": prep.num_prompt_tokens,
        "grid": list(prep.inputs["images"][0].grid),
        "preprocess_s": pre_s,
        "vision_s": vision_s,
        "prefill_s": prefill_s,
        "prefill_tok_s": prep.num_prompt_tokens / prefill_s,
        "decode_tok_s": 1 / statistics.median(steps[2:]),
        "decode_ms_median": 1000 * statistics.median(steps[2:]),
        "batch_decode_tok_s": batch,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20),
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(out), flush=True)


def _clone_cache(cache, extra: int):
    from deepseek_ocr_server.models.common.cache import KVCache

    n = cache.length
    c = KVCache(
        cache.k.shape[0], cache.k.shape[1], cache.k.shape[3], n + extra, cache.k.dtype, cache.k.device,
        limit=cache.limit,
    )
    c.k[:, :, :n] = cache.k[:, :, :n]
    c.v[:, :, :n] = cache.v[:, :, :n]
    c.advance(n)
    return c


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path("/work/cache/deepseek-ocr-full"))
    ap.add_argument("--dtypes", default="auto,f32", help="comma list of auto,bf16,f32,f16 (auto: the default plan)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="*", default=[4], help="also time batched decode steps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    add_cpu_class_argument(ap)
    args = ap.parse_args()
    if not args.child:
        apply_cpu_class(args)
    if args.child:
        child(args)
        return

    from deepseek_ocr_server.models.deepseek_ocr.config import DeepseekOcrConfig

    ensure_checkpoint(args.cache_dir)
    cfg = DeepseekOcrConfig.from_file(args.cache_dir / "config.json")
    bw = measure_bandwidth_gbs(repeats=5)
    ppt = params_per_token(cfg)
    print(f"memory read bandwidth: {bw:.1f} GB/s; weights read per decode token: {ppt / 1e6:.0f} M params")
    results = []
    for name in args.dtypes.split(","):
        need, avail = NEEDS_GIB[name], mem_available_gib()
        if avail < need:
            print(f"[{name}] skipped: needs ~{need:.1f} GiB, {avail:.1f} GiB available")
            continue
        cmd = [sys.executable, __file__, "--child", "--dtype", name, "--cache-dir", str(args.cache_dir),
               "--decode-tokens", str(args.decode_tokens), "--batch", *map(str, args.batch)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"[{name}] failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(line[len("RESULT ") :])
        results.append(r)
        elem = r["weight_bytes_per_param"]
        print(f"[{name}] precision {r['precision']}")
        bound = bw * 1e9 / (ppt * elem)
        print(
            f"[{name}] load {r['load_s']:.1f} s | prompt {r['prompt_tokens']} tok (grid {r['grid']}) | "
            f"preprocess {r['preprocess_s'] * 1000:.0f} ms | vision {r['vision_s']:.2f} s | "
            f"prefill {r['prefill_s']:.2f} s ({r['prefill_tok_s']:.0f} tok/s) | "
            f"decode {r['decode_tok_s']:.2f} tok/s ({r['decode_ms_median']:.1f} ms/tok) | "
            f"bound {bound:.1f} tok/s -> {r['decode_tok_s'] / bound:.0%} of bound | "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB (after load {r['rss_after_load_gib']:.2f})"
        )
        for b, v in r["batch_decode_tok_s"].items():
            print(
                f"[{name}]   batch {b} decode: {v:.2f} tok/s aggregate ({v / r['decode_tok_s']:.2f}x batch 1)"
            )
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(
                f"{r['dtype']} vs {base['dtype']}: vision x{base['vision_s'] / r['vision_s']:.2f}, "
                f"prefill x{base['prefill_s'] / r['prefill_s']:.2f}, decode x{r['decode_tok_s'] / base['decode_tok_s']:.2f}"
            )


if __name__ == "__main__":
    main()
