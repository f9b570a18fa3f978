"""Decode steps of a full-size model at 1..N rows, in-process: aggregate tokens/s per row count, and, on a
widened precision plan (weights stored bf16, computed float32: CPUs without native bf16), the same steps
under each multi-row kernel choice, side by side in one process:

- ``default``: the package's bf16 multi-row kernel (``models/cpukernels.py``) from
  ``cpukernels.MIN_ROWS`` rows on, when it is built;
- ``torch kernels``: without it, the kept float32 copy from ``WideningLinear.wide_min_rows`` rows on
  where the plan keeps one (the behaviour before the kernel), else torch's bf16 kernel;
- ``bf16 kernel at all decode rows``: torch's bf16 kernel at every decode row count (the behaviour
  before the kept copy was used for decode).

Each row is a short text-only prompt (different per row, so DeepSeek-OCR's rows route to different
experts) prefilled once; then ``--steps`` greedy steps per setting, median step time.

    PYTHONPATH=src python bench/bench_decode_rows.py --model paddleocr-vl --as-cpu avx2 --rows 1,4,8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from probe import add_cpu_class_argument, apply_cpu_class, measure_bandwidth_gbs

CKPTS = {"paddleocr-vl": "/work/cache/paddleocr-vl-full", "deepseek-ocr": "/work/cache/deepseek-ocr-full"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CKPTS), default="paddleocr-vl")
    p.add_argument("--ckpt", type=Path, help="full-size checkpoint dir (default: the benchmarks' cache)")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dtype", choices=["auto", "f32", "bf16"], default="auto", help="the precision (auto: the default plan)"
    )
    add_cpu_class_argument(p)
    args = p.parse_args()
    apply_cpu_class(args)
    import torch

    from deepseek_ocr_server.models import cpukernels, load_model
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.layers import WideningLinear

    torch.set_num_threads(args.threads)
    from deepseek_ocr_server.models.precision import choose_precision

    plan = choose_precision("cpu", None if args.dtype == "auto" else args.dtype)
    model = load_model(args.model, ModelFiles.from_dir(args.ckpt or Path(CKPTS[args.model])), dtype=plan)
    print(f"# precision {model.precision.summary()}")
    wide = [m for m in model.net.modules() if isinstance(m, WideningLinear) and m._wide]
    print(f"# package kernels: {cpukernels.status()}")
    # name -> (package kernel on, wide_min_rows)
    settings = {"default": (True, WideningLinear.wide_min_rows)}
    if model.precision.widened and cpukernels.available():
        settings["torch kernels"] = (False, WideningLinear.wide_min_rows)
    if wide:
        settings["bf16 kernel at all decode rows"] = (False, WideningLinear.narrow_max_rows + 1)
        print(
            f"# {len(wide)} widening layers keep a float32 copy (wide_min_rows {WideningLinear.wide_min_rows})"
        )
    from deepseek_ocr_server.testing.probes import decode_weight_bytes

    bandwidth = measure_bandwidth_gbs(args.threads)
    print(f"# read bandwidth {bandwidth:.1f} GB/s")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    results: dict[tuple[str, int], float] = {}
    for rows in args.rows:
        caches, tokens = [], []
        for r in range(rows):
            prep = model.prepare(f"Say {words[r % len(words)]} {r}.", [])
            logits, cache = model.prefill(prep, args.steps * len(settings) + 6)
            caches.append(cache)
            tokens.append(int(logits.argmax()))
        for name, (kernel_on, min_rows) in settings.items():
            cpukernels.enabled = kernel_on
            WideningLinear.wide_min_rows = min_rows
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                logits = model.decode(tokens, caches)
                times.append(time.perf_counter() - t)
                tokens = [int(x) for x in logits.argmax(-1)]
            results[(name, rows)] = rows / statistics.median(times[1:])
        cpukernels.enabled, WideningLinear.wide_min_rows = settings["default"]
        logits, nbytes = decode_weight_bytes(model, tokens, caches)  # the weight bytes one step reads
        line = "  ".join(f"{name}: {results[(name, rows)]:.1f} tok/s" for name in settings)
        bound = rows * bandwidth * 1e9 / nbytes
        print(
            f"rows {rows}: {line}  | a step reads {nbytes / 1e9:.2f} GB: bound {bound:.1f} tok/s, "
            f"default at {100 * results[('default', rows)] / bound:.0f} %",
            flush=True,
        )
    base = results[("default", args.rows[0])]
    for rows in args.rows[1:]:
        print(f"rows {rows} vs rows {args.rows[0]} (default): {results[('default', rows)] / base:.2f}x")


if __name__ == "__main__":
    main()
