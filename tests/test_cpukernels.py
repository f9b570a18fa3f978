"""The package's CPU kernel (``models/cpukernels.py``, ``models/_cpukernels.c``): results against a
float64 reference, the calls it declines, and the layer and model paths that use it.

Where the installed package has no built kernel but a C compiler exists (a source tree run in place),
the tests build the library from the source into a temporary folder, so the kernel is tested wherever it
can run; only a machine without a compiler or without AVX2/FMA skips them.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_ocr_server.models import cpukernels
from deepseek_ocr_server.models.layers import WideningLinear

SOURCE = Path(cpukernels.__file__).with_name("_cpukernels.c")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The kernel library: the installed one, else one built here from the source; restored after."""
    saved = (cpukernels._lib, cpukernels._status)
    if cpukernels.load() is None:
        cc = shutil.which("cc") or shutil.which("gcc")
        if not (sys.platform.startswith("linux") and platform.machine() == "x86_64" and cc):
            pytest.skip(f"no kernel here: {cpukernels.status()}")
        out = tmp_path_factory.mktemp("kernels") / "_cpukernels.so"
        subprocess.run([cc, "-O3", "-fopenmp", "-fPIC", "-shared", str(SOURCE), "-o", str(out)], check=True)
        if cpukernels.load(out) is None:
            pytest.skip(f"no kernel here: {cpukernels.status()}")
    yield cpukernels
    cpukernels._lib, cpukernels._status = saved


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 64])
@pytest.mark.parametrize("shape", [(1, 8), (5, 13), (7, 1000), (64, 64), (100, 129)])
def test_matches_float64(kernel, rows: int, shape: tuple[int, int]) -> None:  # noqa: ANN001
    n, k = shape
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g)
    for bias in (None, b):
        y = kernel.bf16_linear(x, w, bias)
        assert y is not None and y.dtype == torch.float32 and y.shape == (rows, n)
        want = _reference(x, w, bias)
        # float32 sums of k products: a few ulps of the row's magnitude
        tol = 4e-7 * k**0.5 * (want.abs().max().item() + k**0.5)
        assert (y - want).abs().max().item() <= tol, (rows, shape)


def test_leading_shapes_threads_and_strides(kernel) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(1)
    w = torch.randn(33, 72, generator=g).bfloat16()
    x = torch.randn(2, 3, 72, generator=g)  # (batch, seq, features): 6 rows
    y = kernel.bf16_linear(x, w)
    assert y.shape == (2, 3, 33)
    assert torch.allclose(y, _reference(x.reshape(6, 72), w, None).view(2, 3, 33), atol=1e-4)
    xt = torch.randn(72, 5, generator=g).t()  # not contiguous
    assert torch.allclose(kernel.bf16_linear(xt, w), _reference(xt, w, None), atol=1e-4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.bf16_linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y)  # each output is one thread's sum: the split does not change it


def test_declines_what_it_does_not_take(kernel) -> None:  # noqa: ANN001
    w = torch.randn(16, 32).bfloat16()
    assert kernel.bf16_linear(torch.randn(0, 32), w) is None
    assert kernel.bf16_linear(torch.randn(kernel.MAX_ROWS + 1, 32), w) is None
    assert kernel.bf16_linear(torch.randn(4, 32).bfloat16(), w) is None  # float32 activations only
    assert kernel.bf16_linear(torch.randn(4, 32), w.half()) is None
    assert kernel.bf16_linear(torch.randn(4, 32), w, torch.randn(15)) is None  # bias of the wrong size
    kernel.enabled = False
    try:
        assert kernel.bf16_linear(torch.randn(4, 32), w) is None
    finally:
        kernel.enabled = True


def test_widening_linear_takes_it_for_decode_rows(kernel, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 40, generator=g).bfloat16()
    b = torch.randn(24, generator=g)
    lay = WideningLinear(w, b, torch.float32)
    calls: list[int] = []
    real = kernel.bf16_linear

    def spy(x, weight, bias=None):  # noqa: ANN001, ANN202
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr(kernel, "bf16_linear", spy)
    for rows in (1, 2, 3, 8, lay.narrow_max_rows, lay.narrow_max_rows + 1):
        x = torch.randn(rows, 40, generator=g)
        want = _reference(x, w, b)
        got = lay(x)
        # the kernel's rows are float32-accurate; torch's bf16 GEMV rounds the input to bf16
        tol = 1e-4 if kernel.MIN_ROWS <= rows <= lay.narrow_max_rows or rows > lay.narrow_max_rows else 0.1
        assert (got - want).abs().max().item() <= tol, rows
    # every decode-sized call (from MIN_ROWS rows on), not the prefill-sized ones
    assert calls == [r for r in (1, 2, 3, 8, lay.narrow_max_rows) if r >= kernel.MIN_ROWS]


def _decode_steps(kernel, m, words: list[str], steps: int, on: bool, forced=None, alone: bool = False):  # noqa: ANN001, ANN202
    """One sequence prefilled per word, then ``steps`` batched decode steps (greedy, or fed ``forced[i]``)
    with the package's kernels on or off: (tokens per step, logits per step). With ``alone`` each step
    also decodes the first row on a fresh cache of its own, appended as one more row (one-row steps)."""
    kernel.enabled = on
    try:
        caches, toks = [], []
        for word in words:
            logits, cache = m.prefill(m.prepare(f"Say {word}.", []), 8)
            caches.append(cache)
            toks.append(int(logits.argmax()))
        out, logs = [list(toks)], []
        for i in range(steps):
            feed = forced[i] if forced else toks
            logits = m.decode(feed, caches)
            if alone:
                one = m.decode([feed[0]], [m.prefill(m.prepare(f"Say {words[0]}.", []), 8)[1]])
                logits = torch.cat([logits, one])
            logs.append(logits.float())
            toks = [int(t) for t in logits[: len(words)].argmax(-1)]
            out.append(toks)
        return out, torch.stack(logs)
    finally:
        kernel.enabled = True


def test_model_batched_decode_same_tokens_with_and_without(kernel, paddle_ckpt) -> None:  # noqa: ANN001
    """An 8-row decode step of the CPU-without-bf16 plan, kernel on and off (off, 8 rows run the kept
    float32 copy of the same bf16 weights): the same float32 products, so the same greedy tokens and
    logits equal up to float32 rounding."""
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel
    from deepseek_ocr_server.models.precision import decide

    m = PaddleOcrVlModel.load(ModelFiles.from_dir(paddle_ckpt), dtype=decide("cpu", "avx2"))
    assert any(isinstance(mod, WideningLinear) for mod in m.net.modules())
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]

    on_toks, on_logits = _decode_steps(kernel, m, words, 5, on=True)
    off_toks, off_logits = _decode_steps(kernel, m, words, 5, on=False)
    assert on_toks == off_toks
    assert torch.allclose(on_logits, off_logits, rtol=1e-4, atol=1e-4 * off_logits.abs().max().item())
    assert not torch.equal(on_logits, off_logits)  # another summation order: the kernel did run


def test_grouped_experts_equal_one_call_per_expert(kernel) -> None:  # noqa: ANN001
    """The grouped call gives each expert's rows exactly what one call per expert gives (same passes),
    and declines what it does not take."""
    g = torch.Generator().manual_seed(3)
    n, k = 40, 72
    counts = [1, 3, 2, 8, 1, 5, 16, 4]
    weights = [torch.randn(n, k, generator=g).bfloat16() for _ in counts]
    x = torch.randn(sum(counts), k, generator=g)
    y = kernel.bf16_grouped_linear(x, weights, counts)
    assert y is not None and y.shape == (sum(counts), n)
    at = 0
    for w, c in zip(weights, counts, strict=True):
        assert torch.equal(y[at : at + c], kernel.bf16_linear(x[at : at + c], w)), c
        at += c
    assert kernel.bf16_grouped_linear(x, weights, [*counts[:-1], counts[-1] + 1]) is None  # rows != sum
    big = torch.randn(kernel.MAX_ROWS + 1, k)
    assert kernel.bf16_grouped_linear(big, weights[:1], [kernel.MAX_ROWS + 1]) is None  # a prefill
    assert kernel.bf16_grouped_linear(x, [*weights[:-1], weights[-1][:, :-1].contiguous()], counts) is None
    assert kernel.bf16_grouped_linear(x, [w.half() for w in weights], counts) is None


def test_grouped_linear_takes_the_kernel_or_runs_layer_by_layer(
    kernel, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    from deepseek_ocr_server.models.layers import grouped_linear

    g = torch.Generator().manual_seed(4)
    counts = [2, 1, 3]
    wide = [WideningLinear(torch.randn(24, 40, generator=g).bfloat16(), None, torch.float32) for _ in counts]
    x = torch.randn(sum(counts), 40, generator=g)
    want = torch.cat([lay(part) for lay, part in zip(wide, x.split(counts), strict=True)])
    grouped = []
    real = kernel.bf16_grouped_linear
    monkeypatch.setattr(kernel, "bf16_grouped_linear", lambda *a: grouped.append(1) or real(*a))
    assert torch.equal(grouped_linear(wide, x, counts), want) and grouped == [1]
    plain = [torch.nn.Linear(40, 24) for _ in counts]  # not widening layers: layer by layer
    want = torch.cat([lay(part) for lay, part in zip(plain, x.split(counts), strict=True)])
    assert torch.equal(grouped_linear(plain, x, counts), want) and grouped == [1]


@pytest.mark.parametrize(("kv_heads", "group", "d"), [(2, 8, 64), (3, 1, 32), (2, 2, 16), (1, 3, 24)])
def test_decode_attention_matches_torch(kernel, kv_heads: int, group: int, d: int) -> None:  # noqa: ANN001
    """The kernel's decode step (new k/v written, attention per sequence over its own cache, ragged
    lengths, grouped-query heads) against the torch ops it replaces, on the same caches."""
    from deepseek_ocr_server.models.common.cache import KVCache, decode_attention

    g = torch.Generator().manual_seed(kv_heads * 100 + group * 10 + d)
    lengths = [0, 1, 3, 4, 7, 8, 9, 37]  # below, at and past the kernel's blocks of 4 and 8 positions

    def caches() -> list[KVCache]:
        out = []
        for i, n in enumerate(lengths):
            c = KVCache(2, kv_heads, d, n + 1 + i, torch.float32, "cpu")
            gen = torch.Generator().manual_seed(i)
            c.k.copy_(torch.randn(c.k.shape, generator=gen))
            c.v.copy_(torch.randn(c.v.shape, generator=gen))
            c._length = n
            out.append(c)
        return out

    b = len(lengths)
    q = torch.randn(b, kv_heads * group, d, generator=g)
    k = torch.randn(b, kv_heads, d, generator=g)
    v = torch.randn(b, kv_heads, d, generator=g)
    on, off = caches(), caches()
    got = decode_attention(q, k, v, on, 1, d**-0.5)
    kernel.enabled = False
    try:
        want = decode_attention(q, k, v, off, 1, d**-0.5)
    finally:
        kernel.enabled = True
    assert got.shape == want.shape == (b, kv_heads * group * d)
    assert (got - want).abs().max().item() < 1e-5
    for a, c in zip(on, off, strict=True):  # the new key and value written at each sequence's position
        assert torch.equal(a.k, c.k) and torch.equal(a.v, c.v)


def test_decode_attention_declines_what_it_does_not_take(kernel) -> None:  # noqa: ANN001
    keys = [torch.zeros(2, 8, 12)]  # d = 12: not a multiple of 8
    q, k = torch.zeros(1, 2, 1, 12), torch.zeros(1, 2, 12)
    assert kernel.decode_attention(q, k, k, keys, keys, [3]) is None
    keys = [torch.zeros(2, 8, 16)]
    q, k = torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 16)
    assert kernel.decode_attention(q, k, k, keys, keys, [8]) is None  # past the capacity
    assert kernel.decode_attention(q.bfloat16(), k, k, keys, keys, [3]) is None
    half = [t.half() for t in keys]
    assert kernel.decode_attention(q, k, k, half, half, [3]) is None
    assert kernel.decode_attention(q, k, k, keys, keys, [3]) is not None


def test_bf16_plan_keeps_experts_plain_for_the_grouped_kernel(kernel, deepseek_ckpt, monkeypatch) -> None:  # noqa: ANN001
    """A plan computing in bf16 (a CPU with bf16 instructions, or an explicit ``--dtype bf16``) keeps the
    experts of DeepSeek-OCR's MoE layers plain for the grouped kernel, and only those: decode steps of
    one and three rows run it, with the logits of torch's bf16 linear on the same weights up to the bf16
    rounding of a sum taken in another order (teacher-forced, so both runs see the same tokens)."""
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrModel
    from deepseek_ocr_server.models.layers import KernelLinear, keep_experts_plain
    from deepseek_ocr_server.models.precision import decide

    m = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16)
    moe = [layer.mlp for layer in m.net.model.layers if hasattr(layer.mlp, "experts")]
    experts = {
        id(lay): lay for mlp in moe for ex in mlp.experts for lay in (ex.gate_up_proj, ex.down_proj)
    }  # fmt: skip
    assert moe and all(
        type(lay) is KernelLinear and lay.weight.dtype == torch.bfloat16 and not lay._wide
        for lay in experts.values()
    )  # fmt: skip
    # the experts keep ONE plain copy; the other plain layers are the dense twins (keep_decode_twins)
    plain = {id(mod) for mod in m.net.modules() if type(mod) is KernelLinear and not mod._wide}
    assert plain == set(experts)
    # other plans keep their layers as they are
    for plan in (decide("cpu", "avx2"), decide("cpu", "avx512-bf16", "f32")):
        assert keep_experts_plain(torch.nn.Sequential(), plan) == 0

    calls: list[int] = []
    real = kernel.bf16_grouped_linear
    def spy(*a):  # noqa: ANN002, ANN202
        y = real(*a)
        if y is not None:
            calls.append(len(a[2]))
        return y

    monkeypatch.setattr(kernel, "bf16_grouped_linear", spy)
    words = ["alpha", "beta", "gamma"]
    on_toks, on_logits = _decode_steps(kernel, m, words, 4, on=True, alone=True)
    assert calls and kernel.MIN_ROWS <= 1
    calls.clear()
    _, off_logits = _decode_steps(kernel, m, words, 4, on=False, forced=on_toks, alone=True)
    assert not calls  # switched off: torch's bf16 linear layer by layer
    scale = off_logits.abs().max().item()
    assert (on_logits - off_logits).abs().max().item() <= 0.05 * scale


def test_grouped_linear_sends_only_the_few_row_experts_to_the_kernel(kernel, monkeypatch) -> None:  # noqa: ANN001
    """Experts with more rows than the layer's ``narrow_max_rows`` run their own path; the rest share one
    grouped call, and the rows come back in expert order either way."""
    from deepseek_ocr_server.models.layers import KernelLinear, grouped_linear

    g = torch.Generator().manual_seed(5)
    counts = [1, KernelLinear.narrow_max_rows + 3, 2, KernelLinear.narrow_max_rows]
    layers = [KernelLinear(torch.randn(24, 40, generator=g).bfloat16(), None) for _ in counts]
    x = torch.randn(sum(counts), 40, generator=g).bfloat16()
    sent: list[list[int]] = []
    real = kernel.bf16_grouped_linear
    monkeypatch.setattr(kernel, "bf16_grouped_linear", lambda xs, ws, cs: sent.append(list(cs)) or real(xs, ws, cs))
    got = grouped_linear(layers, x, counts)
    assert sent == [[c for c in counts if c <= KernelLinear.narrow_max_rows]]
    want = torch.cat([lay(part) for lay, part in zip(layers, x.split(counts), strict=True)])
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize(
    ("kv_heads", "group", "d"), [(2, 8, 64), (3, 1, 32), (1, 3, 24), (2, 2, 32), (1, 4, 16)]
)  # every value tile
def test_decode_attention_over_bf16_caches_equals_float32_caches(kernel, kv_heads: int, group: int, d: int) -> None:  # noqa: ANN001
    """A bf16 cache holding bf16 values gives what a float32 cache holding the same values gives (the
    kernel widens as it loads: the same float32 products; where d % 16 == 0 the key products are summed
    in another order, so float32 rounding apart), and the new key/value is written rounded to bf16
    (exact here: the inputs are bf16 values)."""
    from deepseek_ocr_server.models.common.cache import KVCache, decode_attention

    lengths = [0, 1, 3, 4, 7, 8, 9, 37]
    g = torch.Generator().manual_seed(kv_heads * 10 + group + d)

    def caches(dtype: torch.dtype) -> list[KVCache]:
        out = []
        for i, n in enumerate(lengths):
            c = KVCache(2, kv_heads, d, n + 1 + i, dtype, "cpu")
            gen = torch.Generator().manual_seed(i)
            c.k.copy_(torch.randn(c.k.shape, generator=gen).bfloat16())
            c.v.copy_(torch.randn(c.v.shape, generator=gen).bfloat16())
            c._length = n
            out.append(c)
        return out

    b = len(lengths)
    q = torch.randn(b, kv_heads * group, d, generator=g).bfloat16()
    k = torch.randn(b, kv_heads, d, generator=g).bfloat16()
    v = torch.randn(b, kv_heads, d, generator=g).bfloat16()
    # the kernel's float32 output, before the caller rounds it to the cache dtype
    qf = q.float().view(b, kv_heads, group, d) * d**-0.5
    raw = {}
    for dtype in (torch.float32, torch.bfloat16):
        cs = caches(dtype)
        pos = [c.length for c in cs]
        raw[dtype] = kernel.decode_attention(
            qf, k.float(), v.float(), [c.k[1] for c in cs], [c.v[1] for c in cs], pos
        )  # fmt: skip
    assert (raw[torch.bfloat16] - raw[torch.float32]).abs().max().item() < 1e-6 * raw[torch.float32].abs().max().item() * d
    wide, narrow = caches(torch.float32), caches(torch.bfloat16)
    want = decode_attention(q, k, v, wide, 1, d**-0.5)
    got = decode_attention(q, k, v, narrow, 1, d**-0.5)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.bfloat16().float()).abs().max().item() <= 2**-7 * want.float().abs().max().item()
    for a, c in zip(narrow, wide, strict=True):
        assert torch.equal(a.k.float(), c.k) and torch.equal(a.v.float(), c.v)
    # torch's ops over the bf16 caches (the kernel off): the same up to their bf16 matmuls' rounding
    kernel.enabled = False
    try:
        ref = decode_attention(q, k, v, caches(torch.bfloat16), 1, d**-0.5)
    finally:
        kernel.enabled = True
    assert (got.float() - ref.float()).abs().max().item() < 3e-2


def test_bf16_kv_cache_plan_gives_the_float32_cache_logits(kernel, deepseek_ckpt, paddle_ckpt) -> None:  # noqa: ANN001
    """The native-bf16 plan with the kernels keeps a bf16 KV cache; its prefill and decode logits equal
    those of the same plan with a float32 cache (the cache holds the same bf16 values; the kernel sums
    the bf16 keys' products in another order, so up to float32 rounding, which the bf16 activations
    mostly absorb), with the same greedy tokens."""
    from dataclasses import replace

    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrModel
    from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel
    from deepseek_ocr_server.models.precision import decide

    plan = decide("cpu", "avx512-bf16", kernels=True)
    assert plan.kv_cache == "bf16" and decide("cpu", "avx512-bf16").kv_cache == "f32"
    for cls, ckpt in ((DeepseekOcrModel, deepseek_ckpt), (PaddleOcrVlModel, paddle_ckpt)):
        runs = []
        for p in (plan, replace(plan, kv_cache="f32")):
            m = cls.load(ModelFiles.from_dir(ckpt), dtype=p)
            assert m.cache_dtype == p.kv_dtype
            caches, toks, steps = [], [], []
            for word in ("alpha", "beta", "gamma"):
                logits, cache = m.prefill(m.prepare(f"Say {word}.", []), 8)
                assert cache.k.dtype == p.kv_dtype
                caches.append(cache)
                toks.append(int(logits.argmax()))
                steps.append(logits.float())
            for _ in range(4):
                logits = m.decode(toks, caches)
                steps.append(logits.float())
                toks = [int(t) for t in logits.argmax(-1)]
            runs.append(torch.cat([s.reshape(-1) for s in steps]))
        scale = runs[1].abs().max().item()
        assert (runs[0] - runs[1]).abs().max().item() <= 1e-2 * scale, cls.__name__


def test_bf16_plan_gives_dense_layers_a_plain_twin_for_few_decode_rows(kernel, deepseek_ckpt, monkeypatch) -> None:  # noqa: ANN001
    """On a bf16-computing plan every dense bf16 language-model layer keeps its plain weight for decode
    steps of 1..TWIN_KERNEL_MAX_ROWS rows (the kernel) and a packed copy for more rows; the vision side
    and the vocabulary projection stay packed only, and the extra bytes are exactly the twins' weights."""
    from deepseek_ocr_server.models import precision as precision_module
    from deepseek_ocr_server.models.base import ModelFiles
    from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrModel
    from deepseek_ocr_server.models.layers import (
        TWIN_KERNEL_MAX_ROWS,
        KernelLinear,
        PackedLinear,
        keep_decode_twins,
    )
    from deepseek_ocr_server.models.precision import decide
    from deepseek_ocr_server.models.registry import family

    # the tiny vocabulary (320) counts as one here, as a real one (>= 100k) does
    monkeypatch.setattr(precision_module, "VOCAB_ROWS", 300)
    m = DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.bfloat16)
    twins = {name: mod for name, mod in m.net.named_modules() if type(mod) is KernelLinear and mod._wide}
    assert twins and all(
        t.narrow_max_rows == TWIN_KERNEL_MAX_ROWS and type(t._wide[0]) is PackedLinear
        and torch.equal(t._wide[0].dense_weight(), t.weight)
        for t in twins.values()
    )  # fmt: skip
    is_vision = family(m.kind).is_vision
    attn = m.net.model.layers[0].self_attn
    assert any(type(mod) is KernelLinear and mod._wide for mod in attn.modules())
    assert not any(is_vision(name) for name in twins)
    assert type(m.net.lm_head) is PackedLinear  # a vocabulary projection: packed only
    vision = [mod for name, mod in m.net.named_modules() if is_vision(name)]
    assert any(isinstance(mod, PackedLinear) for mod in vision)
    assert not any(isinstance(mod, KernelLinear) for mod in vision)

    # rows up to the limit read the plain weight through the kernel, more rows the packed copy
    twin = next(iter(twins.values()))
    used: list[int] = []
    real = kernel.bf16_linear
    monkeypatch.setattr(kernel, "bf16_linear", lambda x, w, b=None: used.append(x.shape[0]) or real(x, w, b))
    g = torch.Generator().manual_seed(6)
    for rows in (1, TWIN_KERNEL_MAX_ROWS, TWIN_KERNEL_MAX_ROWS + 1, 9):
        x = torch.randn(rows, twin.in_features, generator=g).bfloat16()
        got, want = twin(x), twin._wide[0](x)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert (got.float() - want.float()).abs().max().item() <= 0.02 * want.float().abs().max().item()
    assert used == [1, TWIN_KERNEL_MAX_ROWS]

    # other plans, kernels off, or a second copy over the limit: nothing converted
    net = torch.nn.Sequential(torch.nn.Linear(16, 24).bfloat16())
    for plan in (decide("cpu", "avx2"), decide("cpu", "avx512-bf16", "f32")):
        assert keep_decode_twins(net, plan, lambda _n: False) == 0
    bf16 = decide("cpu", "avx512-bf16", kernels=True)
    assert keep_decode_twins(net, bf16, lambda _n: False, max_bytes=16 * 24 * 2 - 1) == 0
    assert type(net[0]) is torch.nn.Linear
    monkeypatch.setattr(kernel, "enabled", False)
    assert keep_decode_twins(net, bf16, lambda _n: False) == 0
    monkeypatch.setattr(kernel, "enabled", True)
    assert keep_decode_twins(net, bf16, lambda _n: False) == 16 * 24 * 2 and type(net[0]) is KernelLinear
