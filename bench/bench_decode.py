"""Single-stream decode speed of one family, this source tree against a baseline tree, side by side.

Each run is its own process (one model resident at a time): it loads the checkpoint (``--dtype``,
default auto: the per-phase plan of this CPU), prefills a short text prompt, then times ``--tokens``
greedy decode steps ``--repeats`` times (after one warm-up pass) and reports the median step. The runs
alternate baseline / this tree ``--rounds`` times, so a neighbour's load hits both alike; the ratio is
of the medians over all steps. Each run also reports its load time and peak RSS (load included). The
baseline is any checkout's ``src`` folder (``git worktree add`` or
``git archive REV | tar -x``)::

    python bench/bench_decode.py --family deepseek-ocr --ckpt CKPT_DIR --baseline-src ../base/src

Not a test: no assertion on speed. Prints the CPU class.
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

#: a text-only prompt per family (decode speed does not depend on the image once the prompt is in)
PROMPTS = {
    "deepseek-ocr": "Free OCR.",
    "deepseek-ocr-2": "Free OCR.",
    "paddleocr-vl": "OCR:",
    "glm-ocr": "Text Recognition:",
}


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(args.src).resolve()))
    import torch

    from deepseek_ocr_server.models import load_model
    from deepseek_ocr_server.models.base import ModelFiles

    torch.set_num_threads(args.threads)
    dtype = {"auto": None, "bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    m = load_model(args.family, ModelFiles.from_dir(args.ckpt), dtype=dtype)
    load_s = time.perf_counter() - t0
    # DeepSeek-OCR 2 serves two view sizes only (the settings are checked even without an image)
    settings = {"image_size": 768} if args.family == "deepseek-ocr-2" else None
    prep = m.prepare(PROMPTS[args.family], [], settings)
    if args.count_ops:  # one decode step at batch 1 and 4 under the profiler: aten ops per step
        from torch.profiler import ProfilerActivity, profile

        counts = {}
        for b in (1, 4):
            caches = [m.prefill(prep, 4)[1] for _ in range(b)]
            m.decode([5] * b, caches)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                m.decode([5] * b, caches)
            counts[b] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        print(json.dumps({"ops": counts}), flush=True)
        return
    steps: list[float] = []
    for rep in range(args.repeats + 1):
        logits, cache = m.prefill(prep, args.tokens + 1)
        tok = int(torch.argmax(logits))
        for _ in range(args.tokens):
            t = time.perf_counter()
            logits = m.decode([tok], [cache])[0]
            dt = time.perf_counter() - t
            tok = int(torch.argmax(logits))
            if rep:  # the first pass warms up
                steps.append(dt)
        cache.release()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB -> GiB (Linux)
    print(json.dumps({"load_s": load_s, "steps": steps, "peak_rss_gib": rss}), flush=True)


def run(args: argparse.Namespace, src: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--src",
        src,
        "--family",
        args.family,
        "--ckpt",
        str(args.ckpt),
        "--dtype",
        args.dtype,
        "--tokens",
        str(args.tokens),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        *(["--count-ops"] if args.count_ops else []),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the --src tree alone decides
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"run for {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    here = Path(__file__).resolve().parent.parent / "src"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(PROMPTS), required=True)
    ap.add_argument(
        "--ckpt", type=Path, required=True, help="checkpoint folder (config.json, weights, tokenizer)"
    )
    ap.add_argument("--baseline-src", help="the baseline tree's src folder (required)")
    ap.add_argument("--src", default=str(here), help="the tree under test (default: this checkout)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f32"])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--count-ops",
        action="store_true",
        help="instead of timing: aten ops in one decode step at batch 1 and 4, per tree (noise-free; small checkpoints do)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not args.baseline_src:
        ap.error("--baseline-src is required")
    import torch

    print(
        f"cpu class: {torch.backends.cpu.get_cpu_capability()}, threads {args.threads}, {args.family} {args.dtype}"
    )
    if args.count_ops:
        for name, src in (("baseline", args.baseline_src), ("this", args.src)):
            print(f"{name:8s}: aten ops in one decode step (batch: count) {run(args, src)['ops']}")
        return
    steps: dict[str, list[float]] = {"baseline": [], "this": []}
    for r in range(args.rounds):
        for name, src in (("baseline", args.baseline_src), ("this", args.src)):
            res = run(args, src)
            steps[name] += res["steps"]
            med = statistics.median(res["steps"])
            print(
                f"round {r + 1} {name:8s}: load {res['load_s']:.1f} s, median step {med * 1e3:.1f} ms "
                f"({1 / med:.2f} tok/s), peak RSS {res['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
    base, this = (statistics.median(steps[k]) for k in ("baseline", "this"))
    print(
        f"median over all steps: baseline {1 / base:.2f} tok/s, this tree {1 / this:.2f} tok/s, "
        f"ratio {base / this:.3f}x (>1: this tree is faster)"
    )


if __name__ == "__main__":
    main()
