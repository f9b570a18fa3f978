"""Decode steps of a full-size model at 1..N rows, in-process: aggregate tokens/s per row count, and, on a
widened precision plan (weights stored bf16, computed float32: CPUs without native bf16), the same steps
under each multi-row kernel choice, side by side in one process:

- ``default``: the package's bf16 multi-row kernel (``models/cpukernels.py``) from
  ``cpukernels.MIN_ROWS`` rows on, when it is built;
- ``torch kernels``: without it, the kept float32 copy from ``WideningLinear.wide_min_rows`` rows on
  where the plan keeps one (the behaviour before the kernel), else torch's bf16 kernel;
- ``bf16 kernel at all decode rows``: torch's bf16 kernel at every decode row count (the behaviour
  before the kept copy was used for decode);
- on a plan that computes in bf16 (a CPU with bf16 instructions), ``experts packed``: the MoE experts
  in oneDNN's packed layout, one call per expert (the behaviour before ``layers.KernelLinear``), against
  the default's plain experts in the grouped kernel (both layouts built once, swapped between settings);
  and ``dense packed only``: the dense layers run their packed copy at every row count (the behaviour
  before ``layers.keep_decode_twins``), against the default's plain twin through the kernel at 1-3 rows.

The bound counts the weight bytes a step reads (``testing.probes.decode_weight_bytes``) plus every
row's KV cache (``--context`` pads the prompts to a page-sized cache).

Each row is a short text-only prompt (different per row, so DeepSeek-OCR's rows route to different
experts) prefilled once; then ``--rounds`` rounds of ``--steps`` greedy steps per setting, the settings
alternating, median step time.

    PYTHONPATH=src python bench/bench_decode_rows.py --model paddleocr-vl --as-cpu avx2 --rows 1,4,8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from probe import add_cpu_class_argument, apply_cpu_class, measure_bandwidth_gbs

CKPTS = {"paddleocr-vl": "/work/cache/paddleocr-vl-full", "deepseek-ocr": "/work/cache/deepseek-ocr-full"}


def kv_cache_bytes(cache) -> int:  # noqa: ANN001 - a family's SequenceCache
    """Bytes of keys and values a decode step's attention reads from ``cache`` (0 for another kind)."""
    k = getattr(cache, "k", None)
    if k is None or k.dim() != 4:
        return 0
    layers, heads, _, d = k.shape
    return 2 * layers * heads * cache.length * d * k.element_size()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CKPTS), default="paddleocr-vl")
    p.add_argument("--ckpt", type=Path, help="full-size checkpoint dir (default: the benchmarks' cache)")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=12, help="timed steps per setting and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the settings (alternating)")
    p.add_argument(
        "--context", type=int, default=0,
        help="filler words before each row's prompt (a page-sized KV cache: ~1.4 tokens a word)",
    )  # fmt: skip
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
    from deepseek_ocr_server.models.layers import KernelLinear, PackedLinear, WideningLinear

    torch.set_num_threads(args.threads)
    from deepseek_ocr_server.models.precision import choose_precision

    plan = choose_precision("cpu", None if args.dtype == "auto" else args.dtype)
    model = load_model(args.model, ModelFiles.from_dir(args.ckpt or Path(CKPTS[args.model])), dtype=plan)
    print(f"# precision {model.precision.summary()}")
    wide = [m for m in model.net.modules() if isinstance(m, WideningLinear) and m._wide]
    print(f"# package kernels: {cpukernels.status()}")
    # name -> (package kernel on, wide_min_rows, which plain layers run packed: "" / "experts" / "dense")
    settings = {"default": (True, WideningLinear.wide_min_rows, "")}
    if model.precision.widened and cpukernels.available():
        settings["torch kernels"] = (False, WideningLinear.wide_min_rows, "")
    if wide and model.precision.widened:
        settings["bf16 kernel at all decode rows"] = (False, WideningLinear.narrow_max_rows + 1, "")
        print(
            f"# {len(wide)} widening layers keep a float32 copy (wide_min_rows {WideningLinear.wide_min_rows})"
        )
    # plain layers of a bf16-computing plan and their packed stand-ins: an expert's is built here (for
    # comparison), a dense twin's is the packed copy it keeps
    swaps: dict[str, list] = {"experts": [], "dense": []}
    for parent in model.net.modules():
        for name, child in parent._modules.items():
            if type(child) is KernelLinear:
                kind, packed = ("dense", child._wide[0]) if child._wide else ("experts", None)
                swaps[kind].append((parent, name, child, packed or PackedLinear(child.weight, child.bias)))
    if swaps["experts"]:
        settings["experts packed"] = (True, WideningLinear.wide_min_rows, "experts")
        print(f"# {len(swaps['experts'])} expert layers plain for the grouped kernel (a packed twin of each for comparison)")
    if swaps["dense"]:
        settings["dense packed only"] = (True, WideningLinear.wide_min_rows, "dense")
        print(f"# {len(swaps['dense'])} dense layers with a plain twin for 1-3 decode rows beside their packed copy")

    def run_packed(kind: str) -> None:
        for k, entries in swaps.items():
            for parent, name, plain, packed in entries:
                parent._modules[name] = packed if k == kind else plain

    from deepseek_ocr_server.testing.probes import decode_weight_bytes

    bandwidth = measure_bandwidth_gbs(args.threads)
    print(f"# read bandwidth {bandwidth:.1f} GB/s")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    results: dict[tuple[str, int], float] = {}
    for rows in args.rows:
        caches, tokens = [], []
        for r in range(rows):
            filler = " ".join(words[(r + i) % len(words)] for i in range(args.context))
            prep = model.prepare(f"{filler} Say {words[r % len(words)]} {r}.".lstrip(), [])
            logits, cache = model.prefill(prep, (args.steps + 1) * len(settings) * args.rounds + 6)
            caches.append(cache)
            tokens.append(int(logits.argmax()))
        times: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(args.rounds):  # the settings alternate, so a neighbour's load hits them alike
            for name, (kernel_on, min_rows, packed) in settings.items():
                cpukernels.enabled = kernel_on
                WideningLinear.wide_min_rows = min_rows
                run_packed(packed)
                for i in range(args.steps + 1):
                    t = time.perf_counter()
                    logits = model.decode(tokens, caches)
                    if i:  # the first step after a switch warms the swapped layers
                        times[name].append(time.perf_counter() - t)
                    tokens = [int(x) for x in logits.argmax(-1)]
        for name in settings:
            results[(name, rows)] = rows / statistics.median(times[name])
        cpukernels.enabled, WideningLinear.wide_min_rows, packed = settings["default"]
        run_packed(packed)
        logits, nbytes = decode_weight_bytes(model, tokens, caches)  # the weight bytes one step reads
        kv = sum(kv_cache_bytes(c) for c in caches)  # and every row's KV cache, read by its attention
        line = "  ".join(f"{name}: {results[(name, rows)]:.1f} tok/s" for name in settings)
        bound = rows * bandwidth * 1e9 / (nbytes + kv)
        print(
            f"rows {rows}: {line}  | a step reads {nbytes / 1e9:.2f} GB of weights + {kv / 1e9:.2f} GB of "
            f"KV cache ({max(c.length for c in caches)} positions): bound {bound:.1f} tok/s, "
            f"default at {100 * results[('default', rows)] / bound:.0f} %",
            flush=True,
        )
    base = results[("default", args.rows[0])]
    for rows in args.rows[1:]:
        print(f"rows {rows} vs rows {args.rows[0]} (default): {results[('default', rows)] / base:.2f}x")


if __name__ == "__main__":
    main()
