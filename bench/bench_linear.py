"""Decode-shaped linear layers on this CPU: how fast each weight storage reads its weights.

For each shape (DeepSeek-OCR's expert and attention projections, PaddleOCR-VL's MLP, an lm_head) and each
row count (one row per running sequence), runs the same layer over many distinct weights (together far
bigger than the caches, so every call reads its weight from DRAM) and prints the effective weight-read
rate in GB/s:

- ``plain bf16`` / ``plain f32``: ``F.linear`` on an ordinary weight (what ``nn.Linear`` does);
- ``packed bf16`` / ``packed f32``: the weight reordered once for oneDNN (``layers.PackedLinear``, what
  the server runs on CPU);
- ``f16 gemv``: ``F.linear`` on a float16 weight (the earlier decode storage; fast at 1 row only);
- ``int8``: ``torch._weight_int8pack_mm`` (``quant.Int8Linear``, ``--quantize int8``), GB/s of int8 bytes;
- ``bf16 kernel``: the package's own kernel (``models/cpukernels.py``: a bf16 weight read once for all rows,
  float32 products; built on Linux x86-64), GB/s of bf16 bytes;
- ``bf16->f32``: a bfloat16 weight widened to float32 per call, then a float32 ``F.linear`` (what
  ``layers.WideningLinear`` does for many rows on a CPU without native bf16), GB/s of bf16 bytes;
- ``stored``: the layer the precision plan of this CPU class builds (``layers.storage_linear``).

Also prints the sum-probe bandwidth measured in the same run and each packed/plain ratio.

    PYTHONPATH=src python bench/bench_linear.py [--rows 1,2,4,8,16] [--threads 2] [--as-cpu avx2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from probe import add_cpu_class_argument, apply_cpu_class, measure_bandwidth_gbs

from deepseek_ocr_server.models import cpukernels
from deepseek_ocr_server.models.layers import PackedLinear, packing_supported, storage_linear
from deepseek_ocr_server.models.quant import Int8Linear

SHAPES = {
    "ds expert gate+up [1792,1280]": (1792, 1280),
    "ds expert down [1280,896]": (1280, 896),
    "ds attention qkv [3840,1280]": (3840, 1280),
    "paddle mlp down [1024,3072]": (1024, 3072),
    "ds lm_head [129280,1280]": (129280, 1280),
}
POOL_BYTES = 320 * 2**20  # distinct bf16 weights per shape: far bigger than the caches


def rate(layers: list, x: torch.Tensor, nbytes: int, repeats: int = 3) -> float:
    best = float("inf")
    with torch.inference_mode():
        for lay in layers[:2]:
            lay(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for lay in layers:
                lay(x)
            best = min(best, time.perf_counter() - t0)
    return nbytes * len(layers) / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kinds", default="", help="comma list of columns to run (default: all)")
    add_cpu_class_argument(p)
    args = p.parse_args()
    apply_cpu_class(args)
    from deepseek_ocr_server.models.precision import choose_precision

    plan = choose_precision("cpu")
    print(f"# precision plan here: {plan.summary()}")
    torch.set_num_threads(args.threads)
    print(f"# sum-probe read bandwidth: {measure_bandwidth_gbs(size_mb=256, repeats=5):.1f} GB/s ({args.threads} threads)")
    print(f"# package kernels: {cpukernels.status()}")
    cols = (
        "plain bf16", "packed bf16", "f16 gemv", "int8", "plain f32", "packed f32", "bf16 kernel", "bf16->f32",
        "stored",
    )  # fmt: skip
    wanted = [c for c in args.kinds.split(",") if c] or list(cols)
    print("| layer | rows | " + " | ".join(wanted) + " |")
    print("|---|---|" + "---|" * len(wanted))
    g = torch.Generator().manual_seed(0)
    for label, (n, k) in SHAPES.items():
        count = max(2, POOL_BYTES // (n * k * 2))
        base = [torch.randn(n, k, generator=g).mul_(0.02) for _ in range(count)]
        kinds: dict[str, tuple[list, torch.dtype, int]] = {}
        bf = [w.bfloat16() for w in base]
        kinds["plain bf16"] = ([lambda x, w=w: F.linear(x, w) for w in bf], torch.bfloat16, n * k * 2)
        if packing_supported("cpu", torch.bfloat16):
            kinds["packed bf16"] = ([PackedLinear(w, None) for w in bf], torch.bfloat16, n * k * 2)
        h = [w.half() for w in base]
        kinds["f16 gemv"] = ([lambda x, w=w: F.linear(x.half(), w) for w in h], torch.bfloat16, n * k * 2)
        q = []
        for w in bf:
            lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            lin.weight.data = w
            q.append(Int8Linear.from_linear(lin))
        kinds["int8"] = (q, torch.bfloat16, n * k)
        del h
        if cpukernels.available():
            kinds["bf16 kernel"] = (
                [lambda x, w=w: cpukernels.bf16_linear(x, w) for w in bf], torch.float32, n * k * 2
            )
        kinds["bf16->f32"] = ([lambda x, w=w: F.linear(x, w.float()) for w in bf], torch.float32, n * k * 2)
        st = plan.weights_dtype
        kinds["stored"] = ([storage_linear(w.to(st), None, plan.compute_dtype) for w in base],
                           plan.compute_dtype, n * k * st.itemsize)
        kinds = {c: v for c, v in kinds.items() if c in wanted}
        f32 = base[: max(2, count // 2)]
        if "plain f32" in wanted:
            kinds["plain f32"] = ([lambda x, w=w: F.linear(x, w) for w in f32], torch.float32, n * k * 4)
        if "packed f32" in wanted:
            kinds["packed f32"] = ([PackedLinear(w, None) for w in f32], torch.float32, n * k * 4)
        for rows in args.rows:
            res = {}
            for name, (layers, dtype, nbytes) in kinds.items():
                x = torch.randn(rows, k, generator=g).to(dtype)
                res[name] = rate(layers, x, nbytes)
            cells = " | ".join(f"{res[c]:.1f}" if c in res else "-" for c in wanted)
            print(f"| {label} | {rows} | {cells} |", flush=True)
        del kinds, base, bf, q, f32


if __name__ == "__main__":
    main()
