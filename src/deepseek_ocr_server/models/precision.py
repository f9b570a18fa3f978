"""Which precision each phase runs in: ONE decision table, keyed on the device and the CPU class.

A model has three kinds of work and they want different formats:

- the vision tower and the prompt prefill are compute-bound (big GEMMs, attention): they want the fastest
  arithmetic the processor has natively, bfloat16 where it has bf16 instructions (AVX512_BF16, AMX, Arm
  BF16), float32 otherwise: without them every bf16 product is emulated (measured on AVX2: a 1024^3 bf16
  GEMM at 0.9 GFLOP/s against 32 in float32; PaddleOCR-VL's vision 171 s against 11.7 s);
- a decode step is bound by reading the language model's weights once: it wants the narrowest storage
  whose kernel reads near the memory bandwidth. bfloat16 storage does on every class measured: on
  AVX2 ``F.linear`` over a bf16 weight at one row reads 30-36 GB/s (float32: 14-20 plain, 25-31 packed),
  so a single stream decodes ~2x faster from bf16 than from f32 bytes;
- the KV cache and decode attention: float32 on CPU (exact for what is written, and the float32
  matrix-vector products at query length 1 are the fast ones everywhere).

So on a CPU without native bf16 the plan is: the vision tower in float32 (it is small: one copy, loaded
straight in float32), the language model's linear weights and embedding stored ONCE in bfloat16 with
float32 activations (``layers.WideningLinear``: a few rows read the bf16 weight directly, through the
package's own kernel where it is built (``cpukernels``), else torch's bf16 kernel; many rows use a
kept float32 copy when the language model is small (``WIDE_COPY_MAX_BYTES``, logged at load), else widen
that one layer's weight to float32 for the duration of the call), norms and other small tensors in
float32.

An explicit ``--dtype`` keeps its meaning (everything in that dtype, the KV cache float32 on CPU);
:func:`slow_choice_warning` says in one line when that is the slow choice on this CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: dtype names as the settings spell them -> torch attribute names
_TORCH = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
#: the classes with bf16 arithmetic in hardware
NATIVE_BF16_CLASSES = frozenset({"avx512-amx", "avx512-bf16", "arm64-bf16"})
#: classes whose bf16-storage decode kernel was measured (others follow by analogy, see the table)
MEASURED_CLASSES = frozenset({"avx512-bf16", "avx2"})
#: A widened model (weights stored narrower than computed) keeps a second, compute-dtype copy of its
#: language-model layers for prefill when that copy is at most this big: PaddleOCR-VL (+1.0 GB) does,
#: DeepSeek-OCR (+10 GB) does not and widens per layer and call instead. The start log says which.
WIDE_COPY_MAX_BYTES = 2 << 30
#: layers with more outputs than this are vocabulary projections (prefill runs them on one row)
VOCAB_ROWS = 32768
#: where auto is not per phase: one dtype for everything (cuda, metal)
_UNIFORM_BY_DEVICE = {"cuda": "bf16", "metal": "f16", "mps": "f16"}


@dataclass(frozen=True)
class Precision:
    """The precision of each phase (dtype names ``f32`` / ``bf16`` / ``f16``).

    ``compute``: the language model's activations, its prefill GEMMs and attention, norms and small
    tensors; ``vision``: the vision tower + projector (weights and activations); ``weights``: storage of
    the language model's linear layers and token embedding (what a decode step reads); ``kv_cache``: the
    KV cache and decode attention."""

    compute: str
    vision: str
    weights: str
    kv_cache: str
    #: "auto (cpu class avx2)" or "explicit bf16"
    source: str = "explicit"

    @property
    def compute_dtype(self) -> Any:
        return _torch_dtype(self.compute)

    @property
    def vision_dtype(self) -> Any:
        return _torch_dtype(self.vision)

    @property
    def weights_dtype(self) -> Any:
        return _torch_dtype(self.weights)

    @property
    def kv_dtype(self) -> Any:
        return _torch_dtype(self.kv_cache)

    @property
    def widened(self) -> bool:
        """Whether the language model's weights are stored narrower than it computes."""
        return self.weights != self.compute

    def summary(self) -> str:
        widen = f" (stored {self.weights}, computed in {self.compute})" if self.widened else ""
        return (
            f"{self.source}: vision {self.vision}, prefill {self.compute}, decode weights "
            f"{self.weights}{widen}, kv cache {self.kv_cache}"
        )

    def as_dict(self) -> dict[str, str]:
        return {
            "source": self.source,
            "vision": self.vision,
            "prefill": self.compute,
            "decode_weights": self.weights,
            "kv_cache": self.kv_cache,
        }


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _TORCH[name])


def decide(device: str, cpu_class: str | None, dtype: str | None = None, kernels: bool = False) -> Precision:
    """THE decision table (pure: no detection, no torch). ``dtype`` None or ``"auto"``: per phase;
    otherwise that dtype everywhere (the KV cache stays float32 on CPU). ``kernels``: whether the
    package's CPU kernels run here (``cpukernels``), which changes one cell, the KV cache of the
    native-bf16 rows (below).

    ================ ======= ======= ============== ==================
    CPU class        vision  prefill decode weights kv cache
    ================ ======= ======= ============== ==================
    avx512-amx       bf16    bf16    bf16           bf16 (kernels) f32
    avx512-bf16      bf16    bf16    bf16           bf16 (kernels) f32
    arm64-bf16       bf16    bf16    bf16           bf16 (kernels) f32
    avx512 (no bf16) f32     f32     bf16           f32
    avx2             f32     f32     bf16           f32
    arm64, apple     f32     f32     bf16           f32
    x86, other       f32     f32     bf16           f32
    ================ ======= ======= ============== ==================

    Decode weights stay bf16 on every class: on AVX2 (measured) the bf16 kernel reads 2x fewer bytes at
    the same rate as float32's best; and f32 storage would double the resident size (DeepSeek-OCR: 12.6 GB
    of weights against 6.3). f16 storage is no better anywhere measured and loses range.

    KV cache: float32, except where the plan computes in bf16 AND the package's kernels run: there the
    keys and values a layer writes are bf16 values, a bf16 cache holds them exactly in half the bytes,
    and the kernel's decode attention reads it (widening as it loads; torch's bf16 batched matmuls would
    compile a oneDNN kernel for every new cache length instead, hence float32 without the kernels).
    """
    dev = "mps" if device == "metal" else device
    if dtype not in (None, "auto"):
        if dtype not in _TORCH:
            raise ValueError(f"unknown dtype {dtype!r} (f32, bf16, f16, auto)")
        kv = "f32" if dev == "cpu" else dtype
        return Precision(dtype, dtype, dtype, kv, source=f"explicit {dtype}")
    if dev != "cpu":
        d = _UNIFORM_BY_DEVICE.get(dev, "f32")
        return Precision(d, d, d, d, source=f"auto ({device})")
    cls = cpu_class or "other"
    compute = "bf16" if cls in NATIVE_BF16_CLASSES else "f32"
    kv = "bf16" if compute == "bf16" and kernels else "f32"
    return Precision(compute, compute, "bf16", kv, source=f"auto (cpu class {cls})")


def choose_precision(device: str = "cpu", dtype: str | None = None) -> Precision:
    """:func:`decide` for this process's CPU (``cpu.detect()``)."""
    cpu_class, kernels = None, False
    if device == "cpu":
        from ..cpu import detect
        from . import cpukernels

        cpu_class = detect().cpu_class
        kernels = cpukernels.active()
    return decide(device, cpu_class, dtype, kernels)


def resolve_precision(dtype: Any, device: Any) -> Precision:
    """What a family's ``load(dtype=...)`` accepts: a :class:`Precision`, a ``torch.dtype`` (explicit),
    a dtype name, or None / ``"auto"`` (the table for this CPU)."""
    if isinstance(dtype, Precision):
        return dtype
    dev = str(getattr(device, "type", device) or "cpu")
    if dtype is None or isinstance(dtype, str):
        return choose_precision(dev, dtype)
    names = {v: k for k, v in _TORCH.items()}
    name = names.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise ValueError(f"unsupported dtype {dtype} (float32, bfloat16, float16)")
    return choose_precision(dev, name)


def slow_choice_warning(
    cpu_class: str, dtype: str | None, quantize: str | None = None, device: str = "cpu"
) -> str | None:
    """One line when an explicit choice is the slow one on this CPU class (None when it is not)."""
    if device != "cpu":
        return None
    parts = []
    native = cpu_class in NATIVE_BF16_CLASSES
    if dtype == "bf16" and not native:
        parts.append(
            f"--dtype bf16 on a CPU without native bf16 (class {cpu_class}): vision and prefill run "
            "emulated bf16 products, 5-15x slower than float32"
        )
    if dtype == "f16":
        parts.append(
            f"--dtype f16 on CPU (class {cpu_class}): float16 products are emulated on every CPU class "
            "measured, several times slower than float32 or bf16"
        )
    if quantize == "int8":
        parts.append(
            f"--quantize int8 (class {cpu_class}): the int8 weight-only kernel reads no faster than bf16 "
            "storage on the classes measured (AVX2: 10-19 GB/s of int8 bytes against 30-36 of bf16 bytes at "
            "one row; AVX512-bf16: ~13 against 33-45 packed), and it changes the results"
        )
    if not parts:
        return None
    return "; ".join(parts) + "; --dtype auto picks per phase: " + decide("cpu", cpu_class).summary()
