"""GLM-OCR CPU benchmark: our implementation vs transformers on the same full-size random checkpoint.

Each (implementation, dtype) runs in its own subprocess (clean peak RSS). One document-like page image
(~1000x1400, 1800 image tokens with the released pixel budget), the default task prompt, the same
number of greedy tokens on both sides. Printed: preprocessing, vision (tower + merger), LM prefill,
decode tok/s, end-to-end page time and peak RSS, our/transformers ratios, and our decode against the
bandwidth bound (bytes of decoder + lm_head weights read per token / read bandwidth measured by
``probe.py`` in the same run), with the CPU class.

    PYTHONPATH=src python bench/bench_glm_ocr.py --dtypes bf16            # alone on the machine
    PYTHONPATH=src python bench/bench_glm_ocr.py --impls ours --dtypes bf16 --max-pixels 400000   # quick
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ... bench/bench_glm_ocr.py                 # AVX2 class

The checkpoint (~2.65 GB, the 526 original keys, random bf16 weights) is built once under --ckpt.
8 streams vs 1 through the real server: ``bench/serve_bench.py --model glm-ocr``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_paddleocr_vl import _rss_mib, page_image
from probe import measure_bandwidth_gbs

DEFAULT_CKPT = Path(os.environ.get("GLM_OCR_BENCH_CKPT", "/work/cache/glm-ocr-full"))
DTYPES = {"bf16": "bfloat16", "f32": "float32"}
PROMPT = "Text Recognition:"


def run_ours(ckpt: Path, dtype: str, max_pixels: int | None, new_tokens: int) -> dict:
    import torch

    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.glm_ocr.model import GlmOcrModel
    from deepseek_ocr_server.testing.probes import decode_weight_bytes, timed_prefill

    t = time.perf_counter()
    model = GlmOcrModel.load(ModelFiles.from_dir(ckpt), dtype=getattr(torch, DTYPES[dtype]))
    if max_pixels:
        from dataclasses import replace

        model.image_config = replace(model.image_config, max_pixels=max_pixels)
    load_s = time.perf_counter() - t
    image = page_image()
    t0 = time.perf_counter()
    prepared = model.prepare(PROMPT, [image])
    t1 = time.perf_counter()
    timed = timed_prefill(model, prepared, new_tokens + 1)  # + the probed step below
    logits, cache = timed.logits, timed.cache
    t3 = time.perf_counter()
    tokens = [int(torch.argmax(logits))]
    for _ in range(new_tokens - 1):
        tokens.append(int(torch.argmax(model.decode([tokens[-1]], [cache])[0])))
    t4 = time.perf_counter()
    return {
        "load_s": load_s,
        "preprocess_s": t1 - t0,
        "vision_s": timed.vision_s,
        "prefill_s": timed.prefill_s,
        "decode_tok_s": (new_tokens - 1) / (t4 - t3),
        "total_s": t4 - t0,
        "prompt_tokens": len(prepared.input_ids),
        "tokens": tokens,
        "peak_rss_mib": _rss_mib(),
        "decode_weight_bytes": decode_weight_bytes(model, tokens[-1:], [cache])[1],  # after the timed steps
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def run_transformers(ckpt: Path, dtype: str, max_pixels: int | None, new_tokens: int) -> dict:
    """transformers' GlmOcrForConditionalGeneration (default attention), inputs assembled exactly as its
    Glm46VProcessor does (that processor needs torchvision for its video half, which is not installed)."""
    import torch
    from transformers import (
        AutoTokenizer,
        GlmOcrForConditionalGeneration,
        LogitsProcessor,
        LogitsProcessorList,
    )
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil
    from transformers.utils.chat_template_utils import render_jinja_template

    t = time.perf_counter()
    model = GlmOcrForConditionalGeneration.from_pretrained(ckpt, dtype=getattr(torch, DTYPES[dtype])).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    image_processor = Glm46VImageProcessorPil.from_pretrained(ckpt)
    template = (ckpt / "chat_template.jinja").read_text()
    load_s = time.perf_counter() - t
    vision: dict[str, float] = {"start": 0.0, "s": 0.0}

    def vision_start(module, args, kwargs=None):
        vision["start"] = time.perf_counter()

    def vision_end(module, args, output):
        vision["s"] += time.perf_counter() - vision["start"]

    model.model.visual.register_forward_pre_hook(vision_start)
    model.model.visual.register_forward_hook(vision_end)
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    image = page_image()
    t0 = time.perf_counter()
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    rendered = render_jinja_template(
        [[{"role": "user", "content": content}]], chat_template=template, add_generation_prompt=True
    )[0][0]
    kw = {"size": {"shortest_edge": image_processor.size["shortest_edge"], "longest_edge": max_pixels}}
    pix = image_processor([image], return_tensors="pt", **(kw if max_pixels else {}))
    n_img = int(pix["image_grid_thw"].prod()) // 4
    image_id = model.config.image_token_id
    ids = [
        x
        for tok in tokenizer(rendered, add_special_tokens=False)["input_ids"]
        for x in ([tok] * n_img if tok == image_id else [tok])
    ]
    input_ids = torch.tensor([ids])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == image_id).int(),
        **pix,
    }
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([Stamp()]),
        )
    t4 = time.perf_counter()
    n = input_ids.shape[1]
    return {
        "load_s": load_s,
        "preprocess_s": t1 - t0,
        "vision_s": vision["s"],
        "prefill_s": stamps[0] - t1 - vision["s"],
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "total_s": t4 - t0,
        "prompt_tokens": n,
        "tokens": out[0, n:].tolist(),
        "peak_rss_mib": _rss_mib(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn = run_ours if args.worker == "ours" else run_transformers
    print("RESULT " + json.dumps(fn(args.ckpt, args.dtype, args.max_pixels, args.new_tokens)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--dtypes", default="bf16,f32")
    p.add_argument("--impls", default="ours,transformers")
    p.add_argument("--max-pixels", type=int, default=None, help="override the checkpoint's max_pixels")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--repeat", type=int, default=1, help="alternate the sides N times, keep each side's fastest"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from deepseek_ocr_server.testing.glm_ocr import build_full_checkpoint

    t = time.perf_counter()
    build_full_checkpoint(args.ckpt)
    print(f"checkpoint {args.ckpt} ready ({time.perf_counter() - t:.1f} s)", flush=True)
    results: dict[tuple[str, str], dict] = {}
    runs = [(d, i) for d in args.dtypes.split(",") for _ in range(args.repeat) for i in args.impls.split(",")]
    for dtype, impl in runs:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            impl,
            "--dtype",
            dtype,
            "--ckpt",
            str(args.ckpt),
            "--new-tokens",
            str(args.new_tokens),
            "--threads",
            str(args.threads),
        ]
        if args.max_pixels:
            cmd += ["--max-pixels", str(args.max_pixels)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{impl} {dtype} FAILED:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(line[-1][7:])
        best = results.get((impl, dtype))
        if best is None or r["total_s"] < best["total_s"]:
            results[(impl, dtype)] = r
        print(
            f"{impl:>12} {dtype} [{r['cpu_capability']}]: "
            + ", ".join(f"{k}={v:.3f}" for k, v in r.items() if isinstance(v, float)),
            flush=True,
        )
    # after the workers: a child's peak RSS would otherwise start at this process's probe buffer
    bandwidth = measure_bandwidth_gbs(args.threads)
    print(f"read bandwidth {bandwidth:.1f} GB/s ({args.threads} threads)", flush=True)
    rows = [
        ("preprocess_s", "preprocess (s)"),
        ("vision_s", "vision+merger (s)"),
        ("prefill_s", "LM prefill (s)"),
        ("decode_tok_s", "decode (tok/s)"),
        ("total_s", "page end-to-end (s)"),
        ("peak_rss_mib", "peak RSS (MiB)"),
        ("load_s", "load (s)"),
    ]
    for dtype in args.dtypes.split(","):
        o, h = results.get(("ours", dtype)), results.get(("transformers", dtype))
        if not o:
            continue
        print(
            f"\n== {dtype} [{o['cpu_capability']}]: {o['prompt_tokens']} prompt tokens, "
            f"{args.new_tokens} generated, {args.threads} threads"
        )
        print(f"{'metric':<22}{'ours':>12}{'transformers':>14}{'ours/tf':>10}")
        for key, label in rows:
            hv = h[key] if h else float("nan")
            print(f"{label:<22}{o[key]:>12.3f}{hv:>14.3f}{o[key] / hv if h else float('nan'):>10.3f}")
        bound = bandwidth * 1e9 / o["decode_weight_bytes"]
        print(
            f"decode bound {bound:.1f} tok/s ({o['decode_weight_bytes'] / 1e9:.2f} GB per token at "
            f"{bandwidth:.1f} GB/s): ours at {100 * o['decode_tok_s'] / bound:.0f} %"
        )
        if h:
            same = sum(a == b for a, b in zip(o["tokens"], h["tokens"], strict=False))
            print(f"greedy tokens identical: {o['tokens'] == h['tokens']} ({same}/{len(o['tokens'])})")
    others = {d: r for (i, d), r in results.items() if i == "transformers"}
    ours = {d: r for (i, d), r in results.items() if i == "ours"}
    if others and ours:
        best_tf = min(others.items(), key=lambda kv: kv[1]["total_s"])
        best_ours = min(ours.items(), key=lambda kv: kv[1]["total_s"])
        print(
            f"\nbest: ours {best_ours[0]} {best_ours[1]['total_s']:.2f} s/page, "
            f"{best_ours[1]['decode_tok_s']:.2f} tok/s; transformers {best_tf[0]} {best_tf[1]['total_s']:.2f} s/page, "
            f"{best_tf[1]['decode_tok_s']:.2f} tok/s; page {best_ours[1]['total_s'] / best_tf[1]['total_s']:.3f}x, "
            f"decode {best_ours[1]['decode_tok_s'] / best_tf[1]['decode_tok_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
