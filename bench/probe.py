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
