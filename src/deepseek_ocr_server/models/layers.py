"""Linear layers with their weights pre-packed for oneDNN, shared by every model family.

On CPU, torch's plain ``F.linear`` reads a bfloat16 weight at ~20 GB/s in a decode step (one row per
sequence) and a float32 one at ~13-18 GB/s, well under the memory bandwidth. The same oneDNN kernel fed a
weight reordered once into its own blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) reads it
at 33-45 GB/s from 1 to 8 rows (bench: ``bench/bench_linear.py``), which is what bounds a decode step;
prefill GEMMs get faster too (float32 ~2x, bfloat16 ~1.15x). For bfloat16 the results are bit-identical
to ``F.linear`` (same kernel, same accumulation); for float32 they differ by rounding only.

:class:`PackedLinear` replaces ``nn.Linear`` after loading (:func:`pack_model`), layer by layer, so
no second copy of the weights is ever alive. It keeps one weight, in the model dtype: prefill, single
and batched decode steps all use it. Sibling projections that read the same input (q/k/v, gate/up) are
already one layer by then (fused at load: ``common.fused``), so they pack as one. Where oneDNN cannot run
the dtype (other devices, a CPU without bfloat16 support in oneDNN, float16 here) the layers stay plain
``nn.Linear`` (:func:`packing_supported`). Exceptions on a bf16-computing plan with the package's
kernels: the experts of a mixture-of-experts layer stay plain for its grouped decode kernel
(:class:`KernelLinear`), and the other dense language-model layers keep a plain twin beside the packed
copy for decode steps of a few rows (:func:`keep_decode_twins`, a logged second copy).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpukernels

log = logging.getLogger(__name__)


def packing_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether :class:`PackedLinear` runs ``dtype`` on ``device`` (CPU with oneDNN: float32 always,
    bfloat16/float16 when oneDNN supports them on this CPU), checked once per dtype by a small self-test
    (the ops are torch-internal: a torch build without them, or with other semantics, keeps plain layers)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return _packing_works(dtype)


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            return False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=g).to(dtype)
        b = torch.randn(48, generator=g).to(dtype)
        x = torch.randn(3, 64, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "").float()
        want = torch.nn.functional.linear(x.float(), w.float(), b.float())
        ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2)) and torch.equal(packed.to_dense(), w)
    except Exception as exc:  # noqa: BLE001 - any failure means: keep plain layers
        log.warning("oneDNN packed linear layers unavailable for %s (%s): using plain layers", dtype, exc)
        return False
    if not ok:
        log.warning("oneDNN packed linear layers give wrong results for %s: using plain layers", dtype)
    return ok


class PackedLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` on CPU whose weight is stored in oneDNN's blocked layout.

    The packed weight is an opaque (``torch._mkldnn`` layout) tensor held as a plain attribute, not a
    parameter (``parameters()`` does not list it); ``state_dict()`` still holds ``weight`` (a dense
    copy) under its original key, and :meth:`dense_weight` / ``.weight`` give it back."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias, "none", [], "").to(
                x.dtype
            )
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """The weight as an ordinary (N, K) tensor (a copy)."""
        return self.packed.to_dense()

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight (what a step that runs this layer reads)."""
        return self.in_features * self.out_features * self.packed.element_size()

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 (torch's signature)
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    @property
    def weight(self) -> torch.Tensor:
        """A dense COPY of the weight (as ``nn.Linear.weight`` reads; for inspection, not for hot paths)."""
        return self.dense_weight()

    def to_linear(self) -> nn.Linear:
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter(self.dense_weight(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed {self.dtype}"


def pack_linears(module: nn.Module, skip: Callable[[str, nn.Linear], bool] | None = None) -> int:
    """Replace every ``nn.Linear`` under ``module`` (in place, layer by layer) by a :class:`PackedLinear`
    when its weight's device and dtype allow it (:func:`packing_supported`); ``skip(name, linear)`` keeps
    a layer as it is. Returns the number of layers packed."""

    def keep(name: str, lin: nn.Linear) -> bool:
        if not packing_supported(lin.weight.device, lin.weight.dtype):
            return True
        return skip is not None and skip(name, lin)

    return replace_linears(module, PackedLinear.from_linear, keep, source=nn.Linear)


def unpack_linears(module: nn.Module) -> int:
    """Turn every :class:`PackedLinear` under ``module`` back into an ``nn.Linear`` (tests, debugging)."""
    return replace_linears(module, lambda p: p.to_linear(), None, source=PackedLinear)


def packed_count(module: nn.Module) -> int:
    """Layers that run pre-packed (:class:`PackedLinear`)."""
    return sum(1 for m in module.modules() if isinstance(m, PackedLinear))


class PackedNet:
    """Mixin for a model family whose torch modules live in ``self.net``: packing of its linear layers
    (:func:`pack_model`) as a model-level switch, and what depends on how they are stored."""

    net: nn.Module

    @property
    def packed_layers(self) -> int:
        """Layers now running pre-packed (:func:`packed_count`; 0 with plain layers)."""
        return packed_count(self.net)

    def set_packed(self, packed: bool) -> None:
        """Store the linear layers pre-packed for oneDNN (the default on CPU), or as plain ``nn.Linear``
        layers (tests compare both). Int8 layers and routers are left alone."""
        pack_model(self.net, packed)


def pack_model(net: nn.Module, packed: bool = True) -> None:
    """Pack (:func:`pack_linears`) every linear layer of ``net``, or undo it (``packed=False``)."""
    if packed:
        pack_linears(net)
    else:
        unpack_linears(net)


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise; RSS would stay at its peak)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def replace_linears(
    module: nn.Module,
    convert: Callable[[nn.Module], nn.Module],
    skip: Callable[[str, nn.Module], bool] | None,
    min_features: int = 0,
    source: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
) -> int:
    """Replace every module of exactly the type ``source`` (or one of them) under ``module`` by ``convert(it)``, in place;
    ``skip(qualified_name, layer)`` keeps a layer, as does ``min(in, out) < min_features``. A layer
    shared by several parents stays shared. Returns the number of layers converted."""
    # Only names are collected first: each old layer is dropped as soon as it is replaced, so the peak
    # memory is the model plus ONE layer, not the model twice.
    sources = source if isinstance(source, tuple) else (source,)
    targets: list[tuple[nn.Module, str]] = []
    seen: dict[int, int] = {}
    for name, mod in module.named_modules():
        for child_name, child in mod._modules.items():  # not named_children(): it hides shared modules
            if type(child) not in sources:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if skip is not None and skip(full, child):
                continue
            if min(child.in_features, child.out_features) < min_features:
                continue
            targets.append((mod, child_name))
            seen[id(child)] = seen.get(id(child), 0) + 1
    # a layer shared by several parents stays shared (its id is stable: it stays alive until its last
    # parent is rewired, and ids of live objects are unique)
    shared: dict[int, nn.Module] = {}
    n = 0
    for parent, child_name in targets:
        child = parent._modules[child_name]
        key = id(child)
        if key in shared:
            new = shared[key]
        else:
            new = convert(child)
            n += 1
            if seen[key] > 1:
                shared[key] = new
        parent._modules[child_name] = new
        del child
    release_freed_memory()
    return n


# --------------------------------------------------------------------------------------------------
# one weight copy, narrower than the activations (the precision plan of a CPU without native bf16)
# --------------------------------------------------------------------------------------------------
class WideningLinear(nn.Module):
    """A linear layer whose weight is stored narrow (bfloat16) while the model computes wider (float32).

    Up to :attr:`narrow_max_rows` rows (decode: one row per running sequence) read the stored weight
    directly (the bandwidth-bound case: half the bytes of float32 at the same read rate): through the
    package's kernel (:func:`.cpukernels.bf16_linear`: one read of the weight for all rows, float32
    products) where it is built, else ``F.linear`` over the stored weight with the input rounded to it
    (one pass per row), or the kept copy from :attr:`wide_min_rows` rows on; more rows (prefill) widen THIS layer's weight to the
    compute dtype for the duration of the call, into a reused scratch buffer, and run a float32 GEMM
    (the compute-bound case: emulated bf16 products are 10-100x slower without bf16 instructions). The
    widened copy is one layer's, transient: the model keeps one copy of its weights. Outputs are in the
    compute dtype."""

    #: measured on AVX2 (``bench/bench_linear.py --as-cpu avx2``): the bf16 kernel's cost grows about
    #: linearly with the rows, widening costs a fixed ~1 ns per weight; they cross at 16-32 rows
    narrow_max_rows: int = 16
    #: with a kept compute-dtype copy (:meth:`keep_wide_copy`), from this many rows on that copy runs
    #: instead: on AVX2 the bf16 kernel at 8 rows reads 3.5-5 GB/s of bf16 bytes, packed float32 6-7
    #: GB/s-equivalent (``bench/bench_linear.py --as-cpu avx2``); at 4 rows they are even
    wide_min_rows: int = 5

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        #: an optional second copy in the compute dtype (packed where oneDNN runs it) that the many-rows
        #: path uses instead of widening per call (:func:`keep_wide_copies`); a tuple: not a submodule
        self._wide: tuple[nn.Module, ...] = ()

    def keep_wide_copy(self) -> None:
        self._wide = (storage_linear(self.weight.detach().to(self.compute_dtype), self.bias, self.compute_dtype),)

    @property
    def wide_nbytes(self) -> int:
        """Bytes of the kept compute-dtype copy (0 without one)."""
        return self.in_features * self.out_features * self.compute_dtype.itemsize if self._wide else 0

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype) -> WideningLinear:
        return cls(linear.weight, linear.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if cpukernels.MIN_ROWS <= rows <= self.narrow_max_rows:
            # several decode rows: the package's kernel reads the bf16 weight once for all of them, in
            # float32 (None when it is not built or does not take the call)
            bias = None if self.bias is None else self.bias.float()
            y = cpukernels.bf16_linear(x.to(torch.float32), self.weight, bias)
            if y is not None:
                return y.to(self.compute_dtype)
        return self._torch_forward(x, rows)

    def _torch_forward(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The call through torch's kernels (the package's kernel off, or too many rows for it)."""
        if rows <= self.narrow_max_rows and not (self._wide and rows >= self.wide_min_rows):
            y = F.linear(x.to(self.weight.dtype), self.weight).to(self.compute_dtype)
            return y if self.bias is None else y + self.bias
        if self._wide:
            return self._wide[0](x.to(self.compute_dtype))
        return F.linear(x.to(self.compute_dtype), widened(self.weight, self.compute_dtype), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.detach().clone()

    def weight_nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"stored {self.weight.dtype}, computes {self.compute_dtype}"
        )


class KernelLinear(WideningLinear):
    """A bfloat16 layer of a plan that computes in bfloat16 (a CPU with bf16 instructions), kept in the
    plain ``[N, K]`` layout the package's kernel reads instead of oneDNN's packed one: the experts of a
    mixture-of-experts layer (:func:`keep_experts_plain`).

    An expert gets one or two rows in a decode step, where oneDNN's packed kernel pays a call of its own
    per expert and reads the weight at 18-24 GB/s (``bench/bench_linear.py``, avx512-bf16); the grouped
    kernel runs every chosen expert of a step in one call at 25-30 GB/s. Decode rows
    (``cpukernels.MIN_ROWS`` .. :attr:`narrow_max_rows`) go through the kernel: float32 products of the
    bf16 weight and the (exactly widened) bf16 activations, summed in float32 and rounded to bf16 like
    oneDNN's output. Also at 8 rows an expert is better off there (117-122 GFLOP/s) than with oneDNN on
    the plain weight, which reorders it per call: DeepSeek-OCR at 8 rows 1.14-1.18x against sending the
    experts of more than 4 rows to oneDNN (``bench/README.md``). More rows (prefill) run torch's bf16 GEMM
    on the plain weight (7-15 % slower than packed for the expert shapes at 88-512 rows, within the noise
    for a whole prefill). One copy of the weight either way.

    A dense layer's twin (:func:`keep_decode_twins`) is one of these with a lower
    :attr:`narrow_max_rows` and a kept packed copy, which its rows past that limit run instead."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias, weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None) -> KernelLinear:
        return cls(linear.weight, linear.bias)

    def _torch_forward(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        # stored in the compute dtype: nothing to widen; the packed twin where one is kept
        # (:func:`keep_decode_twins`), else torch's bf16 GEMM on the plain weight
        if self._wide:
            return self._wide[0](x.to(self.compute_dtype))
        return F.linear(x.to(self.compute_dtype), self.weight, self.bias)


def _kernel_layouts(precision) -> bool:  # noqa: ANN001 - models.precision.Precision
    """Whether the plan keeps plain bf16 layers for the package's kernel (:func:`keep_experts_plain`,
    :func:`keep_decode_twins`): it computes in bfloat16 (storage == compute) and the kernels run."""
    return precision.compute == "bf16" and not precision.widened and cpukernels.active()


def keep_experts_plain(net: nn.Module, precision) -> int:  # noqa: ANN001 - models.precision.Precision
    """On a CPU plan that computes in bfloat16 with the package's kernel available: turn the expert
    layers of every mixture-of-experts module (one that declares ``kernel_experts = True`` and holds
    them in ``experts``) into :class:`KernelLinear`, before packing (which then leaves them plain).
    Returns the number of layers converted (0 on other plans, or with the kernels switched off:
    ``cpukernels.enabled``)."""
    if not _kernel_layouts(precision):
        return 0

    def keep(_name: str, lin: nn.Module) -> bool:
        return lin.weight.dtype != torch.bfloat16 or lin.weight.device.type != "cpu"

    n = 0
    for mod in list(net.modules()):
        if getattr(mod, "kernel_experts", False):
            n += replace_linears(mod.experts, KernelLinear.from_linear, keep, source=nn.Linear)
    if n:
        log.info("%d expert layers kept in the plain bf16 layout for the package's grouped decode kernel", n)
    return n


#: on a plan that computes in bf16 with the package's kernels: a decode step of at most this many rows
#: reads a dense language-model layer through the kernel (its plain bf16 twin, :func:`keep_decode_twins`),
#: more rows run oneDNN's packed copy. Measured on avx512-bf16 (Zen 4, 2 threads, weights from DRAM,
#: DeepSeek-OCR's dense shapes 1280-3840 x 1280-1792): the kernel reads 1.3-1.45x faster than packed at
#: one row, 1.3-1.4x at two, 1.05-1.2x at three, even at four, 0.7x at six
TWIN_KERNEL_MAX_ROWS = 3


def keep_decode_twins(
    net: nn.Module,
    precision,  # noqa: ANN001 - models.precision.Precision
    is_vision: Callable[[str], bool],
    max_bytes: int | None = None,
) -> int:
    """On a CPU plan that computes in bfloat16 with the package's kernel available: give every dense
    bf16 language-model layer (not the vision side, not a vocabulary projection, not an expert: those
    are :class:`KernelLinear` already) a second copy, so that each decode phase reads the layout that is
    fast for it. The plain ``[N, K]`` weight serves decode steps of up to :data:`TWIN_KERNEL_MAX_ROWS`
    rows through the kernel; a packed copy serves more rows (batched decode, prefill), as before. Called
    before packing. The second copy is logged; when all of it would exceed ``max_bytes`` (default
    ``precision.WIDE_COPY_MAX_BYTES``) nothing is converted. Returns the extra bytes kept (0: none)."""
    from .precision import VOCAB_ROWS, WIDE_COPY_MAX_BYTES

    if not _kernel_layouts(precision):
        return 0

    def skip(name: str, lin: nn.Module) -> bool:
        w = lin.weight
        return (
            is_vision(name)
            or w.dtype != torch.bfloat16
            or w.device.type != "cpu"
            or lin.out_features > VOCAB_ROWS
            or not packing_supported(w.device, w.dtype)
        )

    # named_modules() lists a shared layer once: its bytes count once, as it is converted once
    layers = [m for name, m in net.named_modules() if type(m) is nn.Linear and not skip(name, m)]
    need = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    limit = WIDE_COPY_MAX_BYTES if max_bytes is None else max_bytes
    if not layers or need > limit:
        return 0

    def convert(lin: nn.Module) -> nn.Module:
        twin = KernelLinear.from_linear(lin)
        twin.narrow_max_rows = TWIN_KERNEL_MAX_ROWS
        twin.keep_wide_copy()
        return twin

    n = replace_linears(net, convert, skip, source=nn.Linear)
    log.info(
        "keeping a second, packed bf16 copy of %d dense language-model layers (+%.2f GB): decode steps of "
        "1-%d rows read the plain copy through the package's kernel, more rows the packed one",
        n, need / 1e9, TWIN_KERNEL_MAX_ROWS,
    )  # fmt: skip
    return need


def runs_grouped(layer: nn.Module) -> bool:
    """Whether :func:`grouped_linear` sends a decode step over layers like ``layer`` to the package's
    grouped kernel (one call for all of them) rather than layer by layer."""
    return isinstance(layer, WideningLinear) and layer.bias is None and cpukernels.available()


def grouped_linear(layers: list[nn.Module], x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``torch.cat([layers[e](x[rows of e]) for e])`` where expert ``e`` owns the next ``counts[e]`` rows
    of ``x``: the experts of a mixture-of-experts step. Of widening / kernel layers of one shape without
    a bias, the experts with at most ``narrow_max_rows`` rows (a decode step: few rows each) go through
    the package's grouped kernel in one call, the others layer by layer (their own many-rows path);
    anything else runs layer by layer."""
    first = layers[0]
    limit = getattr(first, "narrow_max_rows", 0)
    parts = x.split(counts)
    small = [e for e, c in enumerate(counts) if c <= limit]
    if small and all(runs_grouped(lay) for lay in layers):
        xs = x if len(small) == len(counts) else torch.cat([parts[e] for e in small])
        ys = cpukernels.bf16_grouped_linear(
            xs.to(torch.float32), [layers[e].weight for e in small], [counts[e] for e in small]
        )  # fmt: skip
        if ys is not None:
            ys = ys.to(first.compute_dtype)
            if len(small) == len(counts):
                return ys
            done = dict(zip(small, ys.split([counts[e] for e in small]), strict=True))
            return torch.cat([done[e] if e in done else lay(parts[e]) for e, lay in enumerate(layers)])
    return torch.cat([lay(part) for lay, part in zip(layers, parts, strict=True)])


_SCRATCH = threading.local()
#: the largest widened weight kept in the per-thread scratch buffer (bigger ones allocate per call)
SCRATCH_MAX_BYTES = 64 << 20


def widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` converted to ``dtype``, in a per-thread scratch buffer reused from call to call (a
    fresh multi-MB allocation per call costs page faults, ~2x the conversion itself). The result is
    valid until the next call on the same thread."""
    n = weight.numel()
    if n * dtype.itemsize > SCRATCH_MAX_BYTES or weight.device.type != "cpu":
        return weight.to(dtype)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        _SCRATCH.buf = buf
    return buf[:n].view(weight.shape).copy_(weight)


class WideningEmbedding(nn.Embedding):
    """An embedding table stored narrow whose looked-up rows come out in the compute dtype (the table
    may be shared with a tied output layer: still one copy)."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def storage_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
    """The layer the precision plan builds for a weight stored in ``weight.dtype`` computing in
    ``compute_dtype``: :class:`WideningLinear` when they differ, else packed (or plain) as usual."""
    if weight.dtype != compute_dtype:
        return WideningLinear(weight, bias, compute_dtype)
    if packing_supported(weight.device, weight.dtype):
        return PackedLinear(weight, bias)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def storage_dtypes(net: nn.Module, precision, is_vision: Callable[[str], bool]):  # noqa: ANN001, ANN201
    """``(dtype, overrides)`` for ``weights.load_checkpoint``: each tensor read ONCE straight into the
    dtype its phase runs in (``precision``, a ``models.precision.Precision``): the language model's
    linear weights and token embedding in ``precision.weights`` (the default), the vision side
    (``is_vision(name)``) in ``precision.vision``, everything else (norms, biases, routers, small
    parameters) in ``precision.compute``. ``net`` may live on the meta device. The overrides are keyed
    by the checkpoint's names (a fused layer's stored parts: ``common.fused.checkpoint_names``)."""
    from .common.fused import checkpoint_names

    default = precision.weights_dtype
    vision, compute = precision.vision_dtype, precision.compute_dtype
    overrides: dict[str, torch.dtype] = {}
    stored: set[str] = set()
    for mname, mod in net.named_modules():
        if type(mod) in (nn.Linear, nn.Embedding):
            stored.add(f"{mname}.weight" if mname else "weight")
    in_checkpoint = checkpoint_names(net)
    for name, _ in list(net.named_parameters()) + list(net.named_buffers()):
        want = vision if is_vision(name) else default if name in stored else compute
        if want != default:
            for key in in_checkpoint.get(name, [name]):
                overrides[key] = want
    return default, overrides


def widen_language_layers(net: nn.Module, compute_dtype: torch.dtype) -> int:
    """Turn every plain ``nn.Linear`` / ``nn.Embedding`` whose weight is stored in another dtype than
    ``compute_dtype`` into its widening form (:class:`WideningLinear`, :class:`WideningEmbedding`), in
    place, sharing the weight (no copy). Returns the number of layers converted."""

    def convert(lin: nn.Module) -> nn.Module:
        return WideningLinear.from_linear(lin, compute_dtype)

    def keep(name: str, lin: nn.Module) -> bool:
        return lin.weight.dtype == compute_dtype or not lin.weight.is_floating_point()

    n = replace_linears(net, convert, keep, source=nn.Linear)
    for mod in list(net.modules()):
        for child_name, child in list(mod._modules.items()):
            if type(child) is nn.Embedding and child.weight.dtype != compute_dtype:
                emb = WideningEmbedding(
                    child.num_embeddings, child.embedding_dim, padding_idx=child.padding_idx,
                    _weight=child.weight, _freeze=True,
                )
                emb.compute_dtype = compute_dtype
                mod._modules[child_name] = emb
                n += 1
    return n


def prepare_for_inference(
    net: nn.Module,
    precision,  # noqa: ANN001 - models.precision.Precision
    quantize: str | None,
    is_vision: Callable[[str], bool],
) -> None:
    """What every family's ``load`` does after the strict load (in place, layer by layer): int8
    weight-only quantization of the language side when asked, the widening layers of the precision plan
    (weights stored narrower than the compute dtype), then oneDNN packing and fusing where it runs."""
    if quantize == "int8":
        from .quant import quantize_linears_int8

        quantize_linears_int8(net, skip=lambda name, _lin: is_vision(name))
    if precision.widened:
        widen_language_layers(net, precision.compute_dtype)
        keep_wide_copies(net)
    keep_experts_plain(net, precision)
    keep_decode_twins(net, precision, is_vision)
    pack_model(net)


def keep_wide_copies(net: nn.Module, max_bytes: int | None = None) -> int:
    """When the widening layers' weights fit in ``max_bytes`` in the compute dtype (default
    ``precision.WIDE_COPY_MAX_BYTES``), give each one a kept compute-dtype copy for its many-rows path
    (prefill then runs at float32 GEMM speed, no per-call widening) and log the extra memory. Output
    projections over a vocabulary (more than ``precision.VOCAB_ROWS`` outputs) are left out: prefill runs
    them on one row. Returns the extra bytes kept (0: none, the model is too big)."""
    from .precision import VOCAB_ROWS, WIDE_COPY_MAX_BYTES

    limit = WIDE_COPY_MAX_BYTES if max_bytes is None else max_bytes
    layers = [m for m in net.modules() if isinstance(m, WideningLinear) and m.out_features <= VOCAB_ROWS]
    need = sum(m.in_features * m.out_features * m.compute_dtype.itemsize for m in layers)
    if not layers or need > limit:
        return 0
    for m in layers:
        m.keep_wide_copy()
    release_freed_memory()
    log.info(
        "keeping a second, %s copy of %d language-model layers for prefill (+%.2f GB; the model's %s copy "
        "serves decode)", layers[0].compute_dtype, len(layers), need / 1e9, layers[0].weight.dtype,
    )
    return need
