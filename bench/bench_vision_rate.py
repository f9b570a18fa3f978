"""How close the vision tower runs to this CPU's GEMM peak, in the precision the plan picks for it.

Measures the machine's large-GEMM rate (2048^3, median of repeats) in the vision dtype, then encodes one
document-like page with the full-size random checkpoint's vision tower (PaddleOCR-VL: vision + projector;
DeepSeek-OCR: SAM + CLIP + projector over the Gundam views), counts its FLOPs once with torch's
``FlopCounterMode`` (matrix products and attention), times an uncounted run and prints the achieved rate
and its fraction of the GEMM peak, with the top operators by FLOPs.

    PYTHONPATH=src python bench/bench_vision_rate.py --model paddleocr-vl --as-cpu avx2 --max-pixels 300000
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from probe import add_cpu_class_argument, apply_cpu_class

CKPTS = {"paddleocr-vl": "/work/cache/paddleocr-vl-full", "deepseek-ocr": "/work/cache/deepseek-ocr-full"}


def gemm_peak(dtype, n: int = 2048, repeats: int = 5) -> float:  # noqa: ANN001
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CKPTS), default="paddleocr-vl")
    p.add_argument("--ckpt", type=Path, help="full-size checkpoint dir (default: the benchmarks' cache)")
    p.add_argument("--max-pixels", type=int, default=None, help="PaddleOCR-VL pixel budget (quick runs)")
    p.add_argument("--dtype", default="auto", help="auto (the plan) or f32/bf16")
    p.add_argument("--threads", type=int, default=2)
    add_cpu_class_argument(p)
    args = p.parse_args()
    apply_cpu_class(args)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deepseek_ocr_server.models import load_model
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings

    torch.set_num_threads(args.threads)
    ckpt = args.ckpt or Path(CKPTS[args.model])
    dtype = None if args.dtype == "auto" else {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load_model(args.model, ModelFiles.from_dir(ckpt), dtype=dtype)
    print(f"# precision {model.precision.summary()}")
    vdt = model.precision.vision_dtype
    peak = gemm_peak(vdt)
    print(f"GEMM 2048^3 {str(vdt).removeprefix('torch.')}: {peak:.1f} GFLOP/s ({args.threads} threads)")
    if args.model == "paddleocr-vl":
        from bench_paddleocr_vl import page_image

        if args.max_pixels:
            from dataclasses import replace

            model.image_config = replace(model.image_config, max_pixels=args.max_pixels)
        prep = model.prepare("OCR:", [page_image()])

        def encode() -> None:
            model.encode_images(prep.inputs["pixel_values"], prep.inputs["grids"])
    else:
        from bench_deepseek_ocr import document_image

        prep = model.prepare("<image>\nConvert the document to markdown.", [document_image()], VisionSettings())
        image = prep.inputs["images"][0]

        def encode() -> None:
            with torch.inference_mode():
                model.net.encode_image(image, model.vision_dtype, model.device)

    # counted on plain layers (the counter does not know oneDNN's packed-linear op), timed packed
    model.set_packed(False)
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa(q, k, v, *_args, out_shape=None, **_kw):  # noqa: ANN001, ANN202 - shapes, as the counter passes them
        return sdpa_flop_count(q, k, v)

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
        torch.ops.aten._scaled_dot_product_attention_math: sdpa,
    })
    with counter, torch.inference_mode():
        encode()
    model.set_packed(True)
    flops = counter.get_total_flops()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.inference_mode():
            encode()
        times.append(time.perf_counter() - t)
    best = min(times)
    print(
        f"vision: {flops / 1e12:.2f} TFLOP in {best:.2f} s (best of {len(times)}) = {flops / best / 1e9:.1f} GFLOP/s "
        f"= {flops / best / 1e9 / peak:.0%} of the GEMM peak; at the peak it would take {flops / peak / 1e9:.2f} s"
    )
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:5]
    print("FLOPs by operator: " + ", ".join(f"{k} {v / flops:.0%}" for k, v in top))


if __name__ == "__main__":
    main()
