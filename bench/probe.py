"""The read-bandwidth probe every benchmark here judges its numbers against."""

from __future__ import annotations

import statistics
import time


def measure_bandwidth_gbs(threads: int | None = None, size_mb: int = 1024, repeats: int = 7) -> float:
    """Sustained DRAM read rate (GB/s): median of sums over a buffer much larger than the caches
    (``threads``: torch's intra-op threads for the probe, None to leave them as they are)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    a = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32)
    a.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(times) / 1e9


def add_cpu_class_argument(parser) -> None:  # noqa: ANN001 - an argparse.ArgumentParser
    """``--as-cpu avx2``: run this benchmark as a smaller CPU class (re-executed with the capping env)."""
    parser.add_argument(
        "--as-cpu",
        choices=["native", "avx2", "avx512"],
        default="native",
        help="take the kernels of a smaller CPU class (avx2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
        "MKL_ENABLE_INSTRUCTIONS=AVX2; avx512: oneDNN without bf16). Or set those variables yourself.",
    )


def apply_cpu_class(args) -> str:  # noqa: ANN001 - the parsed argparse.Namespace
    """Re-exec this process under ``--as-cpu``'s environment when it is not in effect yet (the variables
    are read when torch loads, so they must be set before), then print and return the CPU class line.
    Child processes the benchmark starts inherit the environment."""
    import os
    import sys

    from deepseek_ocr_server.cpu import emulation_env

    env = emulation_env(getattr(args, "as_cpu", "native"))
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    from deepseek_ocr_server.cpu import detect

    line = detect().summary()
    print(f"# {line}", flush=True)
    return detect().cpu_class
