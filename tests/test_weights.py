"""models/weights.py: the strict safetensors loader shared by every model family."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepseek_ocr_server.models import weights as W
from deepseek_ocr_server.models.base import ModelLoadError

EXPECTED = {
    "embed.weight": (10, 8),
    "layers.0.proj.weight": (8, 8),
    "layers.0.proj.bias": (8,),
    "layers.1.proj.weight": (8, 8),
    "layers.1.proj.bias": (8,),
    "norm.weight": (8,),
    "scale": (),
}


def _tensors(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in EXPECTED.items()}


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _sharded(d: Path, tensors: dict[str, torch.Tensor], n: int) -> Path:
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = keys[i::n]
        _save(d / name, {k: tensors[k] for k in part})
        weight_map.update(dict.fromkeys(part, name))
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _load(path: Path, dtype: torch.dtype = torch.float32, **kw) -> dict[str, torch.Tensor]:
    return W.load_checkpoint(path, EXPECTED, dtype, model="Test", **kw)


def test_single_file_values_and_dtype(tmp_path: Path) -> None:
    t = _tensors()
    f = _save(tmp_path / "model.safetensors", t)
    state = _load(f)
    assert state.keys() == t.keys()
    assert all(torch.equal(state[k], t[k]) and state[k].dtype == torch.float32 for k in t)
    state = _load(f, torch.bfloat16)
    assert all(torch.equal(state[k], t[k].to(torch.bfloat16)) for k in t)
    assert state["scale"].shape == () and state["embed.weight"].is_contiguous()
    moved = _load(f, torch.float16, device="meta")  # each tensor moves as soon as it is read
    assert {v.device.type for v in moved.values()} == {"meta"} and moved["scale"].dtype == torch.float16


def test_index_and_shards(tmp_path: Path) -> None:
    t = _tensors(1, torch.bfloat16)
    index = _sharded(tmp_path, t, 3)
    assert [p.name for p in W.weight_files(index)] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    state = _load(index, torch.bfloat16)
    assert state.keys() == t.keys() and all(torch.equal(state[k], t[k]) for k in t)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    index = _sharded(tmp_path, _tensors(), 3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"weights file not found: .*model-00002-of-00003\.safetensors"):
        _load(index)
    with pytest.raises(ModelLoadError, match=r"weights file not found: .*nothing\.safetensors"):
        _load(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read shard index"),
        ("[1, 2]", "no 'weight_map' object"),
        ('{"metadata": {}}', "no 'weight_map' object"),
        ('{"weight_map": {}}', "lists no files"),
        ('{"weight_map": {"a": 3}}', "must be file names"),
    ],
)
def test_bad_index(tmp_path: Path, content: str, message: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        _load(index)


def test_one_error_lists_every_problem(tmp_path: Path) -> None:
    t = _tensors()
    del t["layers.0.proj.bias"], t["norm.weight"]  # missing x2
    t["layers.0.extra.weight"] = torch.zeros(3)  # unexpected
    t["layers.1.proj.bias"] = torch.zeros(9)  # wrong shape
    t["old.embed.weight"] = t["embed.weight"].clone()  # stored twice (old and new name)
    f = _save(tmp_path / "model.safetensors", t)
    with pytest.raises(ModelLoadError) as info:
        _load(f, renames=[(re.compile(r"^old\."), "")])
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {f} does not match the Test layout: ")
    assert "missing tensors: layers.0.proj.bias, norm.weight;" in msg
    assert "unexpected tensors: layers.0.extra.weight;" in msg
    assert "wrong shapes: layers.1.proj.bias (checkpoint [9], expected [8]);" in msg
    assert re.search(r"tensors stored twice: embed\.weight \(.*embed\.weight.*old\.embed\.weight", msg)


def test_same_key_in_two_shards_is_stored_twice(tmp_path: Path) -> None:
    t = _tensors()
    index = _sharded(tmp_path, t, 2)
    first = sorted(t)[0]
    _save(tmp_path / "model-00002-of-00002.safetensors", {k: t[k] for k in sorted(t)[1::2] + [first]})
    with pytest.raises(ModelLoadError, match=rf"stored twice: {re.escape(first)} .*00001.*00002"):
        _load(index)


def test_long_lists_are_cut(tmp_path: Path) -> None:
    expected = {f"w.{i:02d}": (2,) for i in range(20)}
    f = _save(tmp_path / "model.safetensors", {"w.00": torch.zeros(2)})
    with pytest.raises(ModelLoadError, match=r"missing tensors: w\.01, .*w\.12, \.\.\. \(7 more\)$"):
        W.load_checkpoint(f, expected, torch.float32, model="Test")


def test_renames_ignored_and_tied(tmp_path: Path) -> None:
    t = _tensors()
    stored = {("model." + k if k.startswith("layers.") else k): v for k, v in t.items()}
    stored["vision.head.weight"] = torch.ones(4)  # ignored
    expected = dict(EXPECTED) | {"head.weight": (10, 8)}  # absent: tied to embed.weight
    f = _save(tmp_path / "model.safetensors", stored)
    state = W.load_checkpoint(
        f,
        expected,
        torch.float32,
        model="Test",
        renames=[(re.compile(r"^model\."), "")],
        ignored=[re.compile(r"^vision\.head\.")],
        tied={"head.weight": "embed.weight"},
    )
    assert state.keys() == expected.keys()
    assert state["head.weight"] is state["embed.weight"]
    assert torch.equal(state["layers.1.proj.weight"], t["layers.1.proj.weight"])
    stored["head.weight"] = torch.full((10, 8), 2.0)  # present: not tied
    _save(f, stored)
    state = W.load_checkpoint(
        f,
        expected,
        torch.float32,
        model="Test",
        renames=[(re.compile(r"^model\."), "")],
        ignored=[re.compile(r"^vision\.head\.")],
        tied={"head.weight": "embed.weight"},
    )
    assert torch.equal(state["head.weight"], torch.full((10, 8), 2.0))


@pytest.mark.parametrize("chunk", [1 << 20, 24])  # whole tensors, and conversion in 24-byte pieces
def test_dtype_override_and_overflow_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(W, "_CHUNK", chunk)
    t = _tensors(2)
    t["layers.1.proj.weight"][7, 7] = 1e6  # in bfloat16's range, not float16's (last chunk)
    f = _save(tmp_path / "model.safetensors", t)
    overrides = {"layers.0.proj.weight": torch.float16, "layers.1.proj.weight": torch.float16}
    state = _load(f, torch.bfloat16, overrides=overrides)
    assert state["layers.0.proj.weight"].dtype == torch.float16
    assert torch.equal(state["layers.0.proj.weight"], t["layers.0.proj.weight"].to(torch.float16))
    assert state["layers.1.proj.weight"].dtype == torch.bfloat16  # fallback, exact values
    assert torch.equal(state["layers.1.proj.weight"], t["layers.1.proj.weight"].to(torch.bfloat16))
    assert {v.dtype for k, v in state.items() if k not in overrides} == {torch.bfloat16}


def test_each_tensor_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "_CHUNK", 64)  # the converted tensors are read in several pieces
    monkeypatch.setattr(W, "_READERS", 3)
    reads: list[tuple[Path, int, int]] = []
    real = W._read_exact

    def spy(fd: int, path: Path, offset: int, buf: memoryview) -> None:
        reads.append((path, offset, len(buf)))
        real(fd, path, offset, buf)

    monkeypatch.setattr(W, "_read_exact", spy)
    t = _tensors(3, torch.bfloat16) | {"ignored.position_ids": torch.arange(100)}
    index = _sharded(tmp_path, t, 2)
    entries = {e.key: e for e in W.read_headers(W.weight_files(index))}
    state = W.load_checkpoint(
        index,
        EXPECTED,
        torch.bfloat16,
        model="Test",
        ignored=[re.compile(r"^ignored\.")],
        overrides={"embed.weight": torch.float32, "layers.0.proj.weight": torch.float16},
    )
    assert all(torch.equal(state[k].to(torch.bfloat16), t[k]) for k in EXPECTED)
    # every byte of every expected tensor read exactly once, nothing else read
    by_file: dict[Path, list[tuple[int, int]]] = {}
    for path, offset, n in reads:
        by_file.setdefault(path, []).append((offset, offset + n))
    want: dict[Path, list[tuple[int, int]]] = {}
    for k in EXPECTED:
        e = entries[k]
        want.setdefault(e.file, []).append((e.offset, e.offset + e.nbytes))
    for path, ranges in by_file.items():
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False)), "overlapping reads"
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        expected_ranges: list[tuple[int, int]] = []
        for a, b in sorted(want[path]):
            if expected_ranges and expected_ranges[-1][1] == a:
                expected_ranges[-1] = (expected_ranges[-1][0], b)
            else:
                expected_ranges.append((a, b))
        assert merged == expected_ranges
    assert sum(n for _, _, n in reads) == sum(entries[k].nbytes for k in EXPECTED)


def test_integer_tensor_for_float_target_rejected(tmp_path: Path) -> None:
    t = _tensors() | {"norm.weight": torch.arange(8)}
    f = _save(tmp_path / "model.safetensors", t)
    with pytest.raises(ModelLoadError, match=r"norm\.weight.*unsupported dtype I64"):
        _load(f)


def test_corrupt_files(tmp_path: Path) -> None:
    f = _save(tmp_path / "model.safetensors", _tensors())
    data = f.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-10])  # last tensor's bytes cut off
    with pytest.raises(ModelLoadError, match=r"cannot read safetensors file .*short.*outside the data"):
        _load(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(ModelLoadError, match=r"cannot read safetensors file .*header length"):
        _load(tmp_path / "huge.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(ModelLoadError, match=r"cannot read safetensors file .*too short"):
        _load(tmp_path / "tiny.safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["norm.weight"]["shape"] = [9]  # 9 float32 values would need 36 bytes, not 32
    raw = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(ModelLoadError, match=r"norm\.weight: 32 bytes for F32 \[9\]"):
        _load(tmp_path / "bad.safetensors")


def test_seek_and_read_fallback_without_preadv(tmp_path, monkeypatch):
    """Windows has no os.preadv: the seek+read fallback reads the same bytes."""
    import importlib
    import os

    import torch
    from safetensors.torch import save_file

    from deepseek_ocr_server.models import weights

    path = tmp_path / "m.safetensors"
    t = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    save_file(t, str(path))
    monkeypatch.delattr(os, "preadv")
    fallback = importlib.reload(weights)
    try:
        state = fallback.load_checkpoint(path, {"a": (3, 4), "b": (5,)}, torch.float32, model="T")
        assert torch.equal(state["a"], t["a"]) and torch.equal(state["b"], t["b"].float())
    finally:
        monkeypatch.undo()
        importlib.reload(weights)
