"""The package's own CPU kernels (``_cpukernels.c``), and when they run.

Two kernels today:

- :func:`bf16_linear` (and :func:`bf16_grouped_linear` for the experts of a mixture-of-experts step):
  the decode step over a weight stored in bfloat16 with float32 activations, the precision plan of a CPU
  without bf16 instructions (``layers.WideningLinear``); on a CPU with them, the experts of a
  mixture-of-experts step (``layers.KernelLinear``: one call for every chosen expert, where oneDNN's
  packed kernel pays a call per expert). torch has no kernel that reads a bf16 weight
  once for several rows there: its bf16 GEMV makes one pass over the weight per row (and rounds the
  float32 input and output to bf16), and oneDNN has no bf16 on AVX2, so 8 rows read a bf16 weight at ~5
  GB/s. This one reads it once for all rows, widening in registers (``bench/bench_linear.py --as-cpu
  avx2``: at 8 rows 2.5-3.5x torch's bf16 kernel and ~2x packed float32 per weight; at one row as fast
  as torch's GEMV or faster).
- :func:`decode_attention`: one decode step of attention for every running sequence over its own
  KV cache (float32; bfloat16 on a plan that computes in bf16, where the cache then holds exactly what
  the model wrote, in half the bytes), in two calls per layer instead of ~7 torch ops per sequence; it reads the caches at 15-21 GB/s where torch's batched matmuls read them at
  7-13 (1.3-2x, ``bench/README.md``).

The library is a plain shared object, built when the package is installed on Linux x86-64 with a C
compiler (``setup.py``: an optional extension, the install goes on without it) and loaded with ctypes.
Without it (no compiler at install time, another architecture, a CPU without AVX2/FMA) every layer runs
torch's kernels as before and :func:`status` says why; nothing else changes.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

#: the library's ABI version this module speaks (``dsocr_kernels_abi`` in the C source)
ABI = 4
#: :func:`bf16_linear` serves steps of at least this many rows: every decode step. At one row it reads
#: the weight as one sequential stream per thread, as fast as torch's bf16 GEMV or faster (25-33 GB/s
#: against 24-28, ``bench/bench_linear.py --as-cpu avx2``), and skips the GEMV's bf16 rounding of the
#: input and output; from two rows on it reads the weight once where torch reads it once per row
MIN_ROWS = 1
#: ... and at most this many (the C side's limit)
MAX_ROWS = 64
#: a switch for benchmarks comparing with and without the kernel in one process
enabled = True

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str | None = None


def library_path() -> Path | None:
    """The built library next to this module (``_cpukernels.<python ext suffix>``), or None."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob("_cpukernels*.so"))
    return found[0] if found else None


def _cpu_supports() -> str | None:
    """None when this CPU runs the kernel's instructions (AVX2 + FMA), else the reason it does not."""
    from ..cpu import detect

    info = detect()
    if info.arch not in ("x86_64", "amd64"):
        return f"no kernels for {info.arch}"
    missing = {"avx2", "fma"} - set(info.flags)
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.dsocr_kernels_abi() != ABI:
        raise OSError(f"{path.name}: ABI {lib.dsocr_kernels_abi()}, expected {ABI} (rebuild the package)")
    if not lib.dsocr_kernels_x86():
        raise OSError(f"{path.name} was built without the x86 kernels")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.bf16_linear_f32
    fn.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.bf16_grouped_linear_f32
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    for kind in ("f32", "bf16kv"):
        fn = getattr(lib, f"attn_scores_{kind}")
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
        fn = getattr(lib, f"attn_values_{kind}")
        fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


def load(path: Path | None = None) -> ctypes.CDLL | None:
    """The library (loaded once per process; ``path`` replaces the installed one, for tests), or None
    with :func:`status` saying why."""
    global _lib, _status
    with _lock:
        if path is None and _status is not None:
            return _lib
        reason = _cpu_supports()
        target = path or library_path()
        lib = None
        if reason is None and target is None:
            reason = "not built (install the package with a C compiler present to build it)"
        if reason is None:
            try:
                lib = _open(target)
            except OSError as exc:
                reason = f"cannot load {target.name}: {exc}"
        _lib, _status = (
            lib,
            ("on (AVX2): bf16 multi-row linear, decode attention" if lib is not None else f"off: {reason}"),
        )
        return _lib


def status() -> str:
    """One line for the start log and ``/health``: what runs, or why the kernels are off."""
    load()
    return _status or ""


def available() -> bool:
    return load() is not None


def active() -> bool:
    """Whether the kernels run in this process: built, loadable and not switched off (:data:`enabled`).
    What a load-time choice that depends on them (a layout, the KV cache dtype) asks."""
    return enabled and available()


def _active() -> ctypes.CDLL | None:
    """The library for a call on the hot path: None when switched off or not loadable."""
    if not enabled:
        return None
    return _lib if _status is not None else load()


def bf16_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``x @ weight.T + bias`` in float32 for a bfloat16 ``weight`` and a float32 ``x`` of
    :data:`MIN_ROWS`..:data:`MAX_ROWS` rows (any leading shape), or None when the kernel does not take
    the call (not built, switched off, other dtypes or devices, too few or too many rows): the caller
    then runs torch's kernel."""
    lib = _active()
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.bfloat16:
        return None
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    n, k = weight.shape
    rows = x.numel() // max(1, k)
    if not MIN_ROWS <= rows <= MAX_ROWS or x.shape[-1] != k:
        return None
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != n):
        return None
    x2 = x.reshape(rows, k).contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    rc = lib.bf16_linear_f32(
        x2.data_ptr(), k, w.data_ptr(), k, None if b is None else b.data_ptr(),
        y.data_ptr(), n, rows, n, k, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        return None
    return y.view(*x.shape[:-1], n)


#: the most experts one grouped call takes (the C side's limit)
MAX_GROUPS = 4096


def bf16_grouped_linear(
    x: torch.Tensor, weights: list[torch.Tensor], counts: list[int]
) -> torch.Tensor | None:
    """The experts of a mixture-of-experts decode step in one call: ``x`` (float32, ``[sum(counts), K]``)
    holds each expert's rows one after the other, ``weights[e]`` (bfloat16 ``[N, K]``, all the same shape)
    multiplies the ``counts[e]`` rows of expert ``e``; returns ``[sum(counts), N]`` in float32, or None
    when the kernel does not take the call (as :func:`bf16_linear`; also when an expert has more than
    :data:`MAX_ROWS` rows: prefill). Each expert's rows get exactly what :func:`bf16_linear` gives them,
    without one Python call, thread fork and weight-stream start per expert."""
    if not weights or len(weights) != len(counts) or len(weights) > MAX_GROUPS:
        return None
    lib = _active()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        return None
    n, k = weights[0].shape
    if x.shape != (sum(counts), k) or not all(1 <= c <= MAX_ROWS for c in counts):
        return None
    for w in weights:
        if w.dtype != torch.bfloat16 or w.shape != (n, k) or not w.is_contiguous() or w.device.type != "cpu":
            return None
    x2 = x.contiguous()
    starts, at = [], 0
    for c in counts:
        starts.append(at)
        at += c
    table = torch.tensor([[w.data_ptr() for w in weights], starts, counts], dtype=torch.int64)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    rc = lib.bf16_grouped_linear_f32(
        x2.data_ptr(), k, table[0].data_ptr(), table[1].data_ptr(), table[2].data_ptr(), len(weights),
        y.data_ptr(), n, n, k, torch.get_num_threads(),
    )  # fmt: skip
    return y if rc == 0 else None


#: the cache dtypes :func:`decode_attention` reads (and the C entry points for each)
CACHE_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16kv"}


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    positions: list[int],
) -> torch.Tensor | None:
    """One decode step of attention for B sequences over their own caches (float32 or bfloat16, all
    alike), or None when the kernel does not take the call (the caller then runs torch's ops).

    ``q`` ``[B, kv_heads, G, d]`` (scaled, float32), the new ``k``/``v`` ``[B, kv_heads, d]`` (float32;
    rounded to nearest in a bf16 cache, exact for values that are bf16 already), ``keys[b]`` /
    ``values[b]``: sequence b's cache of this layer, ``[kv_heads, capacity, d]`` contiguous; the new
    key and value are written at ``positions[b]`` and the query attends to positions 0..``positions[b]``.
    Returns ``[B, kv_heads, G, d]`` float32. The scores come from the kernel (products and sums in
    float32, a bf16 cache widened as it is read), the softmax from torch (over scores padded with -inf
    to the longest sequence), the weighted sum of the values from the kernel."""
    lib = _active()
    if lib is None or q.dim() != 4 or q.dtype != torch.float32 or q.device.type != "cpu" or not keys:
        return None
    b, kvh, g, d = q.shape
    if d % 8 or g > MAX_ROWS or k.shape != (b, kvh, d) or v.shape != (b, kvh, d):
        return None
    if k.dtype != torch.float32 or v.dtype != torch.float32:
        return None
    kind = CACHE_DTYPES.get(keys[0].dtype)
    if kind is None:
        return None
    for kc, vc, p in zip(keys, values, positions, strict=True):
        if kc.dtype != keys[0].dtype or kc.dim() != 3 or kc.shape[0] != kvh or kc.shape[2] != d:
            return None
        if vc.shape != kc.shape or vc.dtype != kc.dtype or not (kc.is_contiguous() and vc.is_contiguous()):
            return None
        if not 0 <= p < kc.shape[1]:
            return None
    lmax = max(positions) + 1
    qc, kn, vn = q.contiguous(), k.contiguous(), v.contiguous()
    table = torch.tensor(
        [
            [t.data_ptr() for t in keys],
            [t.data_ptr() for t in values],
            positions,
            [t.stride(0) for t in keys],
        ],
        dtype=torch.int64,
    )
    scores = torch.empty(b, kvh, g, lmax)
    threads = torch.get_num_threads()
    rc = getattr(lib, f"attn_scores_{kind}")(
        qc.data_ptr(), kn.data_ptr(), vn.data_ptr(), table[0].data_ptr(), table[1].data_ptr(),
        table[2].data_ptr(), table[3].data_ptr(), b, kvh, g, d, scores.data_ptr(), lmax, threads,
    )  # fmt: skip
    if rc != 0:
        return None
    p = torch.softmax(scores, dim=-1)
    out = torch.empty(b, kvh, g, d)
    rc = getattr(lib, f"attn_values_{kind}")(
        p.data_ptr(), table[1].data_ptr(), table[2].data_ptr(), table[3].data_ptr(), b, kvh, g, d, lmax,
        out.data_ptr(), threads,
    )  # fmt: skip
    return out if rc == 0 else None
