"""DeepSeek-OCR 2 CPU benchmark: our implementation vs transformers' native ``deepseek_ocr2`` on the same
FULL-SIZE random checkpoint (official sizes, all 2,707 original keys, BF16, one 6.8 GB file, built once
under --ckpt). Not a test.

One document-like page (1000x1400, the default mode: 1024 global view + 2x3 tiles of 768 px = 1121 image
tokens), the same prompt ids and pixels' rules, greedy decoding with a KV cache on both sides (a manual
loop of forward calls for transformers, so both sides do the same work per token). Each
(implementation, dtype) runs in its own subprocess (clean peak RSS) and appends its result to
--results, so that each exclusive-lock hold stays short:

    flock -x /tmp/ocr-heavy.lock env PYTHONPATH=src python bench/bench_deepseek_ocr2.py --build
    flock -x /tmp/ocr-heavy.lock env PYTHONPATH=src python bench/bench_deepseek_ocr2.py --runs ours:bf16
    flock -x /tmp/ocr-heavy.lock env PYTHONPATH=src python bench/bench_deepseek_ocr2.py --runs tf:bf16
    PYTHONPATH=src python bench/bench_deepseek_ocr2.py --report

Printed per run: preprocessing, vision, prefill, time to first token, decode tok/s (median step), page
time (first token + all --new-tokens), peak RSS; ours also the decode bound (measured read bandwidth /
weight bytes a step read) and the share of it reached. ``--report`` prints our/transformers ratios
against transformers' best dtype, with the CPU class. ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` makes an AVX-512 machine take the AVX2 kernels (the results record it).
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

from probe import add_cpu_class_argument, apply_cpu_class, measure_bandwidth_gbs

DEFAULT_CKPT = Path(os.environ.get("DEEPSEEK_OCR2_BENCH_CKPT", "/work/cache/deepseek-ocr2-full"))
DEFAULT_RESULTS = Path(os.environ.get("DEEPSEEK_OCR2_BENCH_RESULTS", "/tmp/deepseek-ocr2-bench.jsonl"))
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


def page_image(width: int = 1000, height: int = 1400):
    """A deterministic document-like page: title, paragraphs of text lines, a ruled table."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    d.text((80, 60), "QUARTERLY REPORT 2026 - SECTION 4", fill="black")
    y, k = 110, 0
    while y < 800:
        d.text((80, y), " ".join(words[(k + i) % len(words)] for i in range(12)), fill=(20, 20, 20))
        y, k = y + 22, k + 5
    for r in range(8):
        for c in range(5):
            x0, y0 = 80 + c * 168, 840 + r * 60
            d.rectangle([x0, y0, x0 + 168, y0 + 60], outline="black")
            d.text((x0 + 10, y0 + 22), f"{(r * 7 + c * 13) % 97}.{r}{c}", fill="black")
    return img


def build(ckpt: Path) -> None:
    from deepseek_ocr_server.testing.deepseek_ocr2 import build_full_checkpoint

    done = ckpt / ".complete"
    if done.exists():
        print(f"checkpoint ready in {ckpt}")
        return
    t = time.perf_counter()
    build_full_checkpoint(ckpt)
    done.write_text("ok")
    print(f"built {ckpt} in {time.perf_counter() - t:.0f} s")


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def _cpu() -> dict:
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_env": os.environ.get("ATEN_CPU_CAPABILITY", ""),
        "onednn_env": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "threads": torch.get_num_threads(),
    }


def run_ours(ckpt: Path, dtype_name: str, new_tokens: int) -> dict:
    import torch

    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
    from deepseek_ocr_server.models.deepseek_ocr2.model import DeepseekOcr2Model
    from deepseek_ocr_server.testing.probes import decode_weight_bytes, timed_prefill

    # auto: the per-phase precision plan of this CPU class (the server's default)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "auto": None}[dtype_name]
    t = time.perf_counter()
    model = DeepseekOcr2Model.load(ModelFiles.from_dir(ckpt), dtype=dtype)
    load_s = time.perf_counter() - t
    img = page_image()
    t0 = time.perf_counter()
    prepared = model.prepare(PROMPT, [img], VisionSettings(base_size=1024, image_size=768, crop_mode=True))
    t1 = time.perf_counter()
    timed = timed_prefill(model, prepared, new_tokens + 4)  # + the probed steps below
    logits, cache = timed.logits, timed.cache
    t2 = time.perf_counter()
    tok = int(torch.argmax(logits))
    steps, nbytes = [], []
    for _ in range(new_tokens - 1):
        s = time.perf_counter()
        logits = model.decode([tok], [cache])[0]
        tok = int(torch.argmax(logits))
        steps.append(time.perf_counter() - s)
    t3 = time.perf_counter()
    for _ in range(3):  # the bytes a step reads, probed outside the timed steps (hooks cost time)
        logits, read = decode_weight_bytes(model, [tok], [cache])
        tok = int(torch.argmax(logits[0]))
        nbytes.append(read)
    bw = measure_bandwidth_gbs(repeats=5)
    step = statistics.median(steps[2:])
    bound = bw * 1e9 / statistics.median(nbytes)
    return {
        "load_s": load_s,
        "prompt_tokens": prepared.num_prompt_tokens,
        "grid": list(prepared.inputs["images"][0].grid),
        "preprocess_s": t1 - t0,
        "vision_s": timed.vision_s,
        "prefill_s": timed.prefill_s,
        "first_token_s": t2 - t0,
        "decode_tok_s": 1 / step,
        "page_s": t3 - t0,
        "bandwidth_gbs": bw,
        "decode_weight_gb": statistics.median(nbytes) / 1e9,
        "decode_bound_tok_s": bound,
    }


def run_tf(ckpt: Path, dtype_name: str, new_tokens: int) -> dict:
    import tempfile

    import torch
    import transformers
    from tokenizers import Tokenizer

    from deepseek_ocr_server.testing.deepseek_ocr2 import WEIGHTS_NAME, full_config, transformers_config

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype_name]
    image_id = Tokenizer.from_file(str(ckpt / "tokenizer.json")).token_to_id("<image>")
    tmp = Path(tempfile.mkdtemp(prefix="ocr2-tf-"))
    (tmp / "config.json").write_text(
        json.dumps(transformers_config(full_config(), image_id)), encoding="utf-8"
    )
    os.symlink(ckpt / WEIGHTS_NAME, tmp / "model.safetensors")
    t = time.perf_counter()
    model = transformers.DeepseekOcr2ForConditionalGeneration.from_pretrained(tmp, dtype=dtype).eval()
    load_s = time.perf_counter() - t
    img = page_image()
    proc = transformers.DeepseekOcr2ImageProcessorPil()
    t0 = time.perf_counter()
    px = proc(img, return_tensors="pt")
    t1 = time.perf_counter()
    n_tiles = int(px["num_local_patches"][0])
    n_image = 257 + 144 * n_tiles
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = PROMPT.split("<image>")[1]
    # the prompt ids built by hand as the reference does (BOS, N image tokens, the instruction)
    ids = torch.tensor([[0] + [image_id] * n_image + tok.encode(text, add_special_tokens=False).ids])
    with torch.inference_mode():
        feats = model.model.get_image_features(
            px["pixel_values"].to(dtype), px["pixel_values_local"].to(dtype), [n_tiles]
        )
        t2 = time.perf_counter()
        out = model(input_ids=ids, mm_encoder_outputs={"image": feats}, use_cache=True, logits_to_keep=1)
        t3 = time.perf_counter()
        cache = out.cache
        nxt = int(out.logits[0, -1].argmax())
        steps = []
        for _ in range(new_tokens - 1):
            s = time.perf_counter()
            out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
            cache = out.cache
            nxt = int(out.logits[0, -1].argmax())
            steps.append(time.perf_counter() - s)
        t4 = time.perf_counter()
    return {
        "load_s": load_s,
        "prompt_tokens": ids.shape[1],
        "grid_tiles": n_tiles,
        "preprocess_s": t1 - t0,
        "vision_s": t2 - t1,
        "prefill_s": t3 - t2,
        "first_token_s": t3 - t0,
        "decode_tok_s": 1 / statistics.median(steps[2:]),
        "page_s": t4 - t0,
        "attn_implementation": model.config._attn_implementation,
    }


def child(args: argparse.Namespace) -> None:
    impl, dtype = args.child.split(":")
    fn = run_ours if impl == "ours" else run_tf
    r = fn(args.ckpt, dtype, args.new_tokens)
    r.update(impl=impl, dtype=dtype, new_tokens=args.new_tokens, peak_rss_gib=_rss_gib(), **_cpu())
    print("RESULT " + json.dumps(r), flush=True)


def _line(r: dict) -> str:
    s = (
        f"[{r['impl']}:{r['dtype']} {r['cpu_capability']}] load {r['load_s']:.1f} s | prompt {r['prompt_tokens']} tok | "
        f"preprocess {r['preprocess_s'] * 1000:.0f} ms | vision {r['vision_s']:.2f} s | prefill {r['prefill_s']:.2f} s | "
        f"first token {r['first_token_s']:.2f} s | decode {r['decode_tok_s']:.2f} tok/s | "
        f"page ({r['new_tokens']} tok) {r['page_s']:.2f} s | peak RSS {r['peak_rss_gib']:.2f} GiB"
    )
    if "decode_bound_tok_s" in r:
        s += (
            f" | bound {r['decode_bound_tok_s']:.1f} tok/s ({r['decode_weight_gb']:.2f} GB/step at "
            f"{r['bandwidth_gbs']:.1f} GB/s) -> {r['decode_tok_s'] / r['decode_bound_tok_s']:.0%} of bound"
        )
    return s


def report(results: Path) -> None:
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["cpu_capability"], []).append(r)
    for cls, rs in by_class.items():
        print(f"== CPU class {cls} ({rs[0]['threads']} threads)")
        for r in rs:
            print(_line(r))
        ours = [r for r in rs if r["impl"] == "ours"]
        tf = [r for r in rs if r["impl"] == "tf"]
        if not ours or not tf:
            continue
        best_page = min(tf, key=lambda r: r["page_s"])
        best_dec = max(tf, key=lambda r: r["decode_tok_s"])
        best_ftt = min(tf, key=lambda r: r["first_token_s"])
        for o in ours:
            print(
                f"ours:{o['dtype']} vs transformers' best: page x{o['page_s'] / best_page['page_s']:.2f} "
                f"(vs tf:{best_page['dtype']}), first token x{o['first_token_s'] / best_ftt['first_token_s']:.2f} "
                f"(vs tf:{best_ftt['dtype']}), decode x{o['decode_tok_s'] / best_dec['decode_tok_s']:.2f} "
                f"(vs tf:{best_dec['dtype']})"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--build", action="store_true", help="build the full-size checkpoint (once)")
    ap.add_argument("--runs", default="", help="comma list of ours:auto, ours:bf16, ours:f32, tf:bf16, tf:f32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    add_cpu_class_argument(ap)
    args = ap.parse_args()
    apply_cpu_class(args)
    if args.child:
        child(args)
        return
    if args.build:
        build(args.ckpt)
    for run in filter(None, args.runs.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            run,
            "--ckpt",
            str(args.ckpt),
            "--new-tokens",
            str(args.new_tokens),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"[{run}] failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(line[len("RESULT ") :])
        print(_line(r), flush=True)
        with args.results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")
    if args.report:
        report(args.results)


if __name__ == "__main__":
    main()
