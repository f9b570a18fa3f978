"""The CPU class (cpu.py), the per-phase precision table (models/precision.py) and what loading with each
of its plans gives: the same greedy tokens as float32 on the tiny checkpoints.

Tolerance of the 16-bit plans (documented here, and in README's "Precision per CPU" section): fed the
float32 model's greedy tokens, every step's logits stay within 5% of the float32 logits' largest
magnitude, and the greedy tokens agree for the first 4 steps (random tiny models have near-tied logits,
so a rounding difference may flip a later token). The float32 plan is exact.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from deepseek_ocr_server import cpu
from deepseek_ocr_server.cpu import CPU_CLASSES, classify
from deepseek_ocr_server.models import cpukernels
from deepseek_ocr_server.models.base import ModelFiles, ModelLoadError
from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrModel
from deepseek_ocr_server.models.deepseek_ocr.options import VisionSettings
from deepseek_ocr_server.models.glm_ocr.model import GlmOcrModel
from deepseek_ocr_server.models.layers import (
    WideningEmbedding,
    WideningLinear,
    keep_wide_copies,
    storage_dtypes,
    widen_language_layers,
)
from deepseek_ocr_server.models.paddleocr_vl.model import PaddleOcrVlModel
from deepseek_ocr_server.models.precision import Precision, decide, slow_choice_warning
from deepseek_ocr_server.models.registry import family

#: (arch, system, torch capability, flags) that each class is detected from
FAKED = {
    "avx512-amx": ("x86_64", "Linux", "AVX512", {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
    "avx512-bf16": ("x86_64", "Linux", "AVX512", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}),
    "avx512": ("x86_64", "Linux", "AVX512", {"avx2", "avx512f", "avx512_vnni"}),
    "avx2": ("x86_64", "Linux", "AVX2", {"avx2", "fma", "f16c", "avx_vnni"}),
    "x86": ("x86_64", "Windows", "DEFAULT", set()),
    "arm64-bf16": ("aarch64", "Linux", "SVE256", {"asimd", "bf16", "i8mm", "sve"}),
    "arm64": ("aarch64", "Linux", "DEFAULT", {"asimd"}),
    "apple-arm64": ("arm64", "Darwin", "DEFAULT", {"bf16", "i8mm"}),
    "other": ("riscv64", "Linux", "DEFAULT", set()),
}
#: the decision table, phase by phase: (vision, prefill, decode weights, kv cache)
TABLE = {
    "avx512-amx": ("bf16", "bf16", "bf16", "f32"),
    "avx512-bf16": ("bf16", "bf16", "bf16", "f32"),
    "arm64-bf16": ("bf16", "bf16", "bf16", "f32"),
    "avx512": ("f32", "f32", "bf16", "f32"),
    "avx2": ("f32", "f32", "bf16", "f32"),
    "x86": ("f32", "f32", "bf16", "f32"),
    "arm64": ("f32", "f32", "bf16", "f32"),
    "apple-arm64": ("f32", "f32", "bf16", "f32"),
    "other": ("f32", "f32", "bf16", "f32"),
}


def test_every_class_is_faked_and_decided() -> None:
    assert set(FAKED) == set(CPU_CLASSES) == set(TABLE)
    for cls, facts in FAKED.items():
        assert classify(*facts) == cls
        p = decide("cpu", classify(*facts))
        assert (p.vision, p.compute, p.weights, p.kv_cache) == TABLE[cls], cls
        assert p.widened == (p.weights != p.compute)
        assert cls in p.source


def test_kv_cache_is_bf16_only_where_bf16_is_computed_and_the_kernels_run() -> None:
    for cls in CPU_CLASSES:
        p = decide("cpu", cls, kernels=True)
        want = "bf16" if TABLE[cls][1] == "bf16" else "f32"
        assert p.kv_cache == want and (p.vision, p.compute, p.weights) == TABLE[cls][:3], cls
        for d in ("f32", "bf16"):  # an explicit dtype keeps the float32 cache
            assert decide("cpu", cls, d, kernels=True).kv_cache == "f32"


def test_explicit_dtype_means_what_it_says_and_other_devices() -> None:
    for cls in CPU_CLASSES:
        for d in ("f32", "bf16", "f16"):
            p = decide("cpu", cls, d)
            assert (p.vision, p.compute, p.weights, p.kv_cache) == (d, d, d, "f32")
    assert decide("cuda", None).as_dict()["prefill"] == "bf16"
    assert decide("metal", None).kv_cache == "f16"
    assert decide("cuda", None, "f32").kv_cache == "f32"
    with pytest.raises(ValueError, match="unknown dtype"):
        decide("cpu", "avx2", "f8")


def test_slow_choices_warn_in_one_line() -> None:
    w = slow_choice_warning("avx2", "bf16")
    assert w and "\n" not in w and "avx2" in w and "vision f32" in w
    assert slow_choice_warning("avx512-bf16", "bf16") is None
    assert slow_choice_warning("avx2", None) is None and slow_choice_warning("avx2", "f32") is None
    assert "int8" in (slow_choice_warning("avx512-bf16", None, "int8") or "")
    assert slow_choice_warning("avx2", "bf16", device="cuda") is None


def test_emulation_caps_mask_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"})
    # ATEN_CPU_CAPABILITY=avx2: torch reports AVX2 and every AVX-512 flag is hidden
    masked = cpu._mask(flags, "AVX2", onednn_bf16=False)
    assert masked == {"avx2"} and classify("x86_64", "Linux", "AVX2", masked) == "avx2"
    # oneDNN capped below bf16 on an AVX-512 machine: the class without bf16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    masked = cpu._mask(flags, "AVX512", onednn_bf16=False)
    assert classify("x86_64", "Linux", "AVX512", masked) == "avx512"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert classify("x86_64", "Linux", "AVX512", cpu._mask(flags, "AVX512", True)) == "avx512-amx"
    assert cpu.emulation_env("avx2")["ATEN_CPU_CAPABILITY"] == "avx2" and cpu.emulation_env("native") == {}


def test_detect_reports_this_machine() -> None:
    info = cpu.detect()
    assert info.capability == str(torch.backends.cpu.get_cpu_capability())
    assert info.cpu_class in CPU_CLASSES
    d = info.as_dict()
    assert d["class"] == info.cpu_class and "\n" not in info.summary()


def test_widening_linear_one_copy_both_paths() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g).bfloat16()
    b = torch.randn(48, generator=g)
    lay = WideningLinear(w, b, torch.float32)
    assert lay.weight.data_ptr() == w.data_ptr()  # the stored weight itself, not a copy
    for rows in (1, lay.narrow_max_rows, lay.narrow_max_rows + 5):
        x = torch.randn(rows, 40, generator=g)
        got = lay(x)
        want = torch.nn.functional.linear(x, w.float(), b)
        assert got.dtype == torch.float32
        tol = 0 if rows > lay.narrow_max_rows else 0.05  # the narrow path rounds x to bf16
        assert torch.allclose(got, want, atol=tol + 1e-5, rtol=1e-5 if not tol else 0.02), rows


def test_wide_copies_only_within_the_budget() -> None:
    net = nn.Sequential(nn.Linear(40, 48, bias=False), nn.Linear(48, 40_000, bias=False)).bfloat16()
    widen_language_layers(net, torch.float32)
    assert keep_wide_copies(net, max_bytes=100) == 0 and not net[0]._wide  # over budget: widen per call
    assert keep_wide_copies(net) == 40 * 48 * 4  # the vocabulary-sized layer gets none
    assert net[0]._wide and not net[1]._wide
    x = torch.randn(net[0].narrow_max_rows + 3, 40)
    assert torch.allclose(net[0](x), torch.nn.functional.linear(x, net[0].weight.float()), atol=1e-5)
    # a batched decode step of wide_min_rows rows or more runs the kept copy too (exact float32), and
    # from cpukernels.MIN_ROWS rows on the package's kernel runs when it is built (float32 products of
    # the same bf16 weight: float32-accurate too); fewer rows stay on torch's bf16 kernel (the input
    # rounded to bf16)
    kernel_from = cpukernels.MIN_ROWS if cpukernels.available() else net[0].wide_min_rows
    for rows in (1, 2, net[0].wide_min_rows - 1, net[0].wide_min_rows, net[0].narrow_max_rows):
        x = torch.randn(rows, 40)
        want = torch.nn.functional.linear(x, net[0].weight.float())
        err = (net[0](x) - want).abs().max().item()
        assert (err < 1e-5) == (rows >= min(kernel_from, net[0].wide_min_rows)), (rows, err)
    assert "_wide" not in str(dict(net.named_modules()))  # not a submodule: state_dict unchanged


def test_storage_dtypes_one_dtype_per_phase(deepseek_ckpt) -> None:  # noqa: ANN001
    plan = decide("cpu", "avx2")
    from deepseek_ocr_server.models.deepseek_ocr.config import DeepseekOcrConfig
    from deepseek_ocr_server.models.deepseek_ocr.model import DeepseekOcrForCausalLM

    with torch.device("meta"):
        net = DeepseekOcrForCausalLM(DeepseekOcrConfig.from_file(deepseek_ckpt / "config.json"))
    default, overrides = storage_dtypes(net, plan, family("deepseek-ocr").is_vision)
    assert default == torch.bfloat16
    assert "lm_head.weight" not in overrides and "model.embed_tokens.weight" not in overrides
    assert overrides["model.norm.weight"] == torch.float32
    assert all(v == torch.float32 for v in overrides.values())
    assert any(k.startswith("model.sam_model.") for k in overrides)
    assert not any(k.startswith("model.layers.") and k.endswith("proj.weight") for k in overrides)


def _page() -> Image.Image:
    img = Image.new("RGB", (300, 200), (250, 250, 245))
    d = ImageDraw.Draw(img)
    for y in range(10, 190, 24):
        d.rectangle((12, y, 270, y + 8), fill=(20, 20, 20))
    return img


def _run(m, n: int, forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:  # noqa: ANN001
    prep = m.prepare(
        "<image>\nRead it.", [_page()], VisionSettings(base_size=512, image_size=512, crop_mode=False)
    )
    logits, cache = m.prefill(prep, n + 1)
    toks, out = [], [logits]
    for i in range(n):
        toks.append(int(torch.argmax(logits)))
        logits = m.decode([forced[i] if forced else toks[-1]], [cache])[0]
        out.append(logits)
    return toks, torch.stack(out)


#: every distinct plan the table produces on CPU (the explicit bf16 one equals the native-bf16 one without
#: the kernels; with them, the native-bf16 plan keeps a bf16 KV cache)
PLANS = list(
    {
        (p.vision, p.compute, p.weights, p.kv_cache): p
        for p in [*map(lambda c: decide("cpu", c), CPU_CLASSES), decide("cpu", "avx512-bf16", kernels=True)]
    }.values()
)


#: family -> (model class, fixture of its tiny checkpoint)
FAMILIES = {
    "deepseek": (DeepseekOcrModel, "deepseek_ckpt"),
    "paddle": (PaddleOcrVlModel, "paddle_ckpt"),
    "glm": (GlmOcrModel, "glm_ckpt"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_plan_gives_the_float32_tokens(family: str, request: pytest.FixtureRequest) -> None:
    cls, fixture = FAMILIES[family]
    files = ModelFiles.from_dir(request.getfixturevalue(fixture))
    n = 8
    ref = cls.load(files, dtype=decide("cpu", None, "f32"))
    ref_toks, ref_logits = _run(ref, n)
    again, again_logits = _run(cls.load(files, dtype=torch.float32), n)
    assert again == ref_toks and torch.equal(again_logits, ref_logits)  # f32: exact
    scale = ref_logits.abs().max()
    for plan in PLANS:
        m = cls.load(files, dtype=plan)
        assert m.precision == plan and m.dtype == plan.compute_dtype and m.cache_dtype == plan.kv_dtype
        _check_storage(m.net, plan, m.kind)
        toks, _ = _run(m, 4)
        assert toks == ref_toks[:4], plan
        _, logits = _run(m, n, forced=ref_toks)
        assert (logits - ref_logits).abs().max() <= 0.05 * scale, plan


def _check_storage(net: nn.Module, plan: Precision, kind: str) -> None:
    """Every language-model weight stored once in the plan's decode dtype, the vision side in its own."""
    is_vision = family(kind).is_vision
    for name, p in net.named_parameters():
        if is_vision(name):
            assert p.dtype == plan.vision_dtype, name
    for name, mod in net.named_modules():
        if is_vision(name):
            continue
        if plan.widened:  # every stored layer in its widening form: one bf16 copy, no float32 one
            assert type(mod) not in (nn.Linear, nn.Embedding), name
        if isinstance(mod, WideningLinear | WideningEmbedding):
            assert mod.weight.dtype == plan.weights_dtype and mod.compute_dtype == plan.compute_dtype


def test_bad_dtype_is_a_load_error(deepseek_ckpt) -> None:  # noqa: ANN001
    with pytest.raises(ModelLoadError, match="dtype"):
        DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype=torch.int8)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        DeepseekOcrModel.load(ModelFiles.from_dir(deepseek_ckpt), dtype="f8")


def test_health_and_metrics_show_the_cpu_class(api_server) -> None:  # noqa: ANN001
    with httpx.Client(timeout=30) as http:
        h = http.get(api_server.base_url + "/health").json()
        assert h["cpu"]["class"] == cpu.detect().cpu_class
        assert h["cpu"]["torch_capability"] == str(torch.backends.cpu.get_cpu_capability())
        assert h["cpu"]["kernels"] == cpukernels.status()  # built and on, or off with the reason
        metrics = http.get(api_server.base_url + "/metrics").text
    assert "ocr_cpu_info{" in metrics and f'class="{cpu.detect().cpu_class}"' in metrics
    assert f'kernels="{cpukernels.status()}"' in metrics


def test_a_family_without_plans_gets_one_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_ocr_server import models

    seen: dict[str, object] = {}

    class OneDtype:
        @classmethod
        def load(cls, files, device="cpu", dtype=None, quantize=None):  # noqa: ANN001, ANN206
            seen["dtype"] = dtype
            return cls()

    monkeypatch.setattr(models, "model_class", lambda kind: OneDtype)
    models.load_model("x", None, device="cpu", dtype=None)  # type: ignore[arg-type]
    want = decide("cpu", cpu.detect().cpu_class).compute_dtype
    assert seen["dtype"] == want
    models.load_model("x", None, device="cpu", dtype=torch.float16)  # type: ignore[arg-type]
    assert seen["dtype"] == torch.float16
