"""What this processor runs natively: one small detection, read once per process.

The class decides the precision plan (``models/precision.py``): bfloat16 matrix products are fast only
where the CPU has bf16 instructions (AVX512_BF16, AMX, Arm BF16); elsewhere torch and oneDNN emulate them
10-100x slower than float32. Sources, all observable without running a kernel:

- torch's dispatch level, ``torch.backends.cpu.get_cpu_capability()`` (``AVX512``, ``AVX2``,
  ``DEFAULT``, ``SVE256``...); it honours ``ATEN_CPU_CAPABILITY``;
- whether oneDNN runs bf16 / f16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported``); it honours
  ``ONEDNN_MAX_CPU_ISA``;
- the kernel's feature flags (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS).

A big machine can pose as a smaller one (benchmarks do): ``ATEN_CPU_CAPABILITY=avx2`` plus
``ONEDNN_MAX_CPU_ISA=AVX2`` (and ``MKL_ENABLE_INSTRUCTIONS=AVX2``) make torch, oneDNN and MKL take their
AVX2 kernels; the detection then masks the flags those levels hide, so the class reads ``avx2``.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Any

#: The flags the plan or the log cares about (x86 names as in /proc/cpuinfo; Arm: bf16, i8mm, sve).
X86_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
)
ARM_FLAGS = ("asimd", "bf16", "i8mm", "sve", "sve2")
#: Flags that need AVX-512 (hidden when torch's or oneDNN's level is capped below it).
_AVX512 = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16"})
#: The environment that makes a bigger x86 CPU take the AVX2 kernels (torch, oneDNN, MKL).
AVX2_EMULATION_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
#: Every CPU class the plan knows, most capable first.
CPU_CLASSES = (
    "avx512-amx",
    "avx512-bf16",
    "avx512",
    "avx2",
    "x86",
    "arm64-bf16",
    "arm64",
    "apple-arm64",
    "other",
)


@dataclass(frozen=True)
class CpuInfo:
    """The detected processor. ``flags`` are the effective ones (masked by emulation caps)."""

    arch: str  # x86_64 | aarch64 | arm64 | ...
    system: str  # Linux | Darwin | Windows
    capability: str  # torch's dispatch level
    onednn_bf16: bool  # oneDNN runs bfloat16 here (possibly emulated below AVX512_BF16)
    onednn_fp16: bool
    flags: frozenset[str] = field(default_factory=frozenset)
    model_name: str = ""
    #: the capping variables in effect (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, ...), "" when none
    caps: str = ""

    @property
    def cpu_class(self) -> str:
        return classify(self.arch, self.system, self.capability, self.flags)

    @property
    def native_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware: matrix products in bf16 run faster than float32."""
        return self.cpu_class in ("avx512-amx", "avx512-bf16", "arm64-bf16")

    def as_dict(self) -> dict[str, Any]:
        return {
            "class": self.cpu_class,
            "arch": self.arch,
            "system": self.system,
            "torch_capability": self.capability,
            "onednn_bf16": self.onednn_bf16,
            "onednn_fp16": self.onednn_fp16,
            "native_bf16": self.native_bf16,
            "flags": sorted(self.flags),
            "model": self.model_name,
            "emulation": self.caps,
        }

    def summary(self) -> str:
        """One log line."""
        flags = ",".join(sorted(self.flags)) or "-"
        emu = f", capped by {self.caps}" if self.caps else ""
        return (
            f"cpu class {self.cpu_class} ({self.model_name or self.arch}; torch {self.capability}, oneDNN bf16 "
            f"{'yes' if self.onednn_bf16 else 'no'}, flags {flags}{emu})"
        )


def classify(arch: str, system: str, capability: str, flags: frozenset[str] | set[str]) -> str:
    """The class from the (effective) facts: a pure function, tested with faked inputs."""
    arch = arch.lower()
    cap = capability.upper()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        if cap.startswith("AVX512"):
            if "amx_bf16" in flags:
                return "avx512-amx"
            if "avx512_bf16" in flags:
                return "avx512-bf16"
            return "avx512"
        if cap == "AVX2":
            return "avx2"
        return "x86"
    if arch in ("aarch64", "arm64"):
        if system == "Darwin":
            return "apple-arm64"
        return "arm64-bf16" if "bf16" in flags else "arm64"
    return "other"


def _read_flags(arch: str, system: str) -> tuple[frozenset[str], str]:
    wanted = set(X86_FLAGS) | set(ARM_FLAGS)
    if system == "Linux":
        try:
            text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
        except OSError:
            return frozenset(), ""
        flags: set[str] = set()
        name = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = set(value.split()) & wanted
            elif key in ("model name", "cpu model") and not name:
                name = value.strip()
        return frozenset(flags), name
    if system == "Darwin":
        found: set[str] = set()
        probes = {"bf16": "hw.optional.arm.FEAT_BF16", "i8mm": "hw.optional.arm.FEAT_I8MM"}
        for flag, key in probes.items():
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=2).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            if out.strip() == "1":
                found.add(flag)
        return frozenset(found), platform.processor()
    return frozenset(), platform.processor()


def _mask(flags: frozenset[str], capability: str, onednn_bf16: bool) -> frozenset[str]:
    """Hide what the capped levels do not use: AVX-512 flags below torch's AVX512, bf16/AMX when oneDNN
    does not run bf16 (``ONEDNN_MAX_CPU_ISA=AVX2`` or ``AVX512_CORE``)."""
    out = set(flags)
    if not capability.upper().startswith("AVX512"):
        out -= _AVX512
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if not onednn_bf16 or (isa and "BF16" not in isa and "AMX" not in isa and isa != "ALL"):
        out -= {"avx512_bf16", "amx_bf16"}
    if isa and "AMX" not in isa and isa != "ALL":
        out -= {"amx_bf16"}
    return frozenset(out)


@functools.cache
def detect() -> CpuInfo:
    """The processor, detected once per process (imports torch)."""
    import torch

    arch, system = platform.machine(), platform.system()
    capability = str(torch.backends.cpu.get_cpu_capability())
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        bf16 = fp16 = False
    raw, name = _read_flags(arch, system)
    caps = " ".join(
        f"{k}={os.environ[k]}"
        for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
        if os.environ.get(k)
    )
    return CpuInfo(arch, system, capability, bf16, fp16, _mask(raw, capability, bf16), name, caps)


def emulation_env(cpu_class: str | None) -> dict[str, str]:
    """Environment that makes a subprocess take the kernels of ``cpu_class`` (``avx2``; None: none)."""
    if cpu_class in (None, "", "native"):
        return {}
    if cpu_class == "avx2":
        return dict(AVX2_EMULATION_ENV)
    if cpu_class == "avx512":  # AVX-512 without bf16: oneDNN capped below AVX512_CORE_BF16
        return {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}
    raise ValueError(f"cannot emulate cpu class {cpu_class!r} (avx2, avx512)")


def cpu_info() -> dict[str, Any]:
    """:meth:`CpuInfo.as_dict` of :func:`detect` plus ``kernels``, what the package's own CPU kernels
    do here (``models/cpukernels.py``: the one line of its ``status``) (``/health``)."""
    from .models.cpukernels import status

    return {**detect().as_dict(), "kernels": status()}
